"""Self-distillation prompts built offline from what is on this machine.

Drafters for a chat target are trained on the target's own answers to chat-style prompts. No
dataset may be downloaded, so the prompts are composed here: instruction templates over word
lists (conversation, writing, QA, math with generated numbers, translation), and passages of the
Python standard library's docstrings (summarization, retrieval-augmented QA, code tasks from
function descriptions). Every prompt is a one-turn conversation [{"role": "user", ...}].
The set is a pure function of the seed. None of it comes from the held-out benchmark prompts
(`specbench_like.jsonl`).
"""

from __future__ import annotations

import ast
import random
import re

from jaxspec.train.data import stdlib_files, stdlib_root

TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "volcanoes", "the immune system",
    "black holes", "the French Revolution", "machine learning", "climate change", "electric cars",
    "the stock market", "plate tectonics", "the human heart", "renewable energy", "inflation",
    "the printing press", "quantum computing", "honeybees", "the Roman Empire", "earthquakes",
    "vaccines", "the internet", "recycling", "sleep", "gravity", "rainbows", "tides", "bread baking",
    "coffee", "chess", "jazz music", "the Olympic Games", "coral reefs", "deserts", "glaciers",
    "the moon landing", "solar panels", "blockchain", "public libraries", "democracy", "meditation",
    "nutrition", "marathon training", "gardening", "bird migration", "the Silk Road", "pyramids",
    "antibiotics", "the periodic table", "magnets", "batteries", "airplanes", "submarines",
    "rain forests", "the ocean", "dinosaurs", "evolution", "DNA", "the brain", "memory",
    "time management", "public speaking", "job interviews", "budgeting", "learning a language",
    "team work", "remote work", "first aid", "camping", "photography", "painting", "poetry",
    "the Renaissance", "ancient Greece", "the industrial revolution", "trains", "bicycles",
    "smartphones", "password security", "cloud computing", "databases", "open source software",
    "wind turbines", "nuclear power", "the atmosphere", "hurricanes", "snow", "soil", "mushrooms",
    "cats", "dogs", "elephants", "whales", "owls", "ants", "spiders", "sharks", "penguins",
]

PEOPLE = ["a new employee", "my landlord", "a customer", "my manager", "a teacher", "a neighbour",
          "an old friend", "the hotel staff", "a client", "my team", "a professor", "a supplier"]
SUBJECTS = ["a delayed delivery", "a team lunch next week", "a project deadline", "a refund",
            "a job application", "a broken heater", "a birthday party", "a schedule change",
            "a conference talk", "a new software release", "a holiday request", "a thank-you"]
AUDIENCES = ["a ten-year-old", "a beginner", "a high school student", "an expert", "my grandmother",
             "a busy executive", "a university student"]
FORMATS = ["in three bullet points", "in one paragraph", "in simple words", "with an example",
           "step by step", "in about 100 words", "as a short list"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]
SENTENCE_PARTS = (
    ["The meeting", "Our train", "The new bakery", "My sister", "The museum", "The weekly market",
     "The bus to the airport", "The school concert", "Their office", "The swimming pool"],
    ["starts at", "will open at", "leaves at", "is closed until", "moves to the new building at",
     "begins every Monday at"],
    ["eight o'clock", "half past ten", "noon", "three in the afternoon", "seven in the evening"],
    ["because of the holidays.", "so please arrive early.", "and tickets are free.",
     "unless it rains.", "according to the website.", "for the rest of the month."],
)
QUESTIONS = ["What is {t}?", "How does {t} work?", "Why is {t} important?",
             "What are the main facts everyone should know about {t}?",
             "What are common misconceptions about {t}?", "What is the history of {t}?",
             "What are the advantages and disadvantages of {t}?"]
REQUESTS = ["Explain {t} to {a} {f}.", "Write a short poem about {t}.",
            "Give me five interesting facts about {t}.", "Write a short story that involves {t}.",
            "Describe {t} {f}.", "What would happen if {t} disappeared? Answer {f}.",
            "Suggest three ways a school could teach {t}.", "Write a blog post introduction about {t}.",
            "Compare {t} and {u}.", "Give tips for someone who wants to learn about {t}.",
            "Write a friendly email to {p} about {s}.", "Write a polite message to {p} about {s}.",
            "Plan a one-day itinerary for a visitor interested in {t}.",
            "List the pros and cons of {t} {f}."]
CODE_TASKS = ["reverses a linked list", "checks whether a number is prime", "merges two sorted lists",
              "counts the words in a text file", "computes the n-th Fibonacci number",
              "removes duplicates from a list while keeping order", "parses a CSV line",
              "finds the longest common prefix of a list of strings", "validates an email address",
              "flattens a nested list", "converts Celsius to Fahrenheit", "implements binary search",
              "returns the most common element of a list", "checks balanced parentheses",
              "sorts a dictionary by its values", "computes the factorial of n",
              "reads a JSON file and prints its keys", "implements a stack class",
              "generates all permutations of a string", "computes the average of a list of numbers",
              "counts vowels in a string", "transposes a matrix", "finds the second largest number",
              "implements a simple LRU cache", "converts a Roman numeral to an integer"]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 12)
    kind = rng.randrange(6)
    if kind == 0:
        return (f"A shop sells notebooks at {c} for {a * c} dollars. How much do {b} notebooks cost? "
                "Show your reasoning step by step.")
    if kind == 1:
        return (f"A car travels {a * 10} kilometres in {c} hours. What is its average speed? "
                "Explain each step.")
    if kind == 2:
        return (f"Anna has {a} marbles and gives {min(a - 1, b)} to her friend, then buys {c} more. "
                "How many marbles does she have now? Solve step by step.")
    if kind == 3:
        return f"What is {b} percent of {a * 20}? Show your work."
    if kind == 4:
        return (f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter? "
                "Explain.")
    return f"Solve for x: {c}x + {a} = {a + c * b}. Explain each step."


def _docstring_passages(limit: int, rng: random.Random) -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) of standard-library functions and classes."""
    files = stdlib_files()
    rng.shuffle(files)
    root = stdlib_root()
    out = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                para = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
                if 80 <= len(para) <= 600:
                    out.append((f"{module}.{node.name}", para))
        if len(out) >= limit:
            break
    return out[:limit]


def build_prompts(count: int = 1200, seed: int = 0) -> list[list[dict]]:
    """`count` one-turn conversations mixing the categories above, deterministic in `seed`."""
    rng = random.Random(seed)
    passages = _docstring_passages(max(64, count // 4), rng)
    prompts = []
    for i in range(count):
        kind = i % 8
        t, u = rng.sample(TOPICS, 2)
        if kind in (0, 1):
            text = rng.choice(REQUESTS).format(t=t, u=u, a=rng.choice(AUDIENCES), f=rng.choice(FORMATS),
                                               p=rng.choice(PEOPLE), s=rng.choice(SUBJECTS))
        elif kind == 2:
            text = rng.choice(QUESTIONS).format(t=t)
        elif kind == 3:
            text = _math_prompt(rng)
        elif kind == 4:
            sentence = " ".join(rng.choice(part) for part in SENTENCE_PARTS)
            text = f"Translate the following English text into {rng.choice(LANGUAGES)}:\n\n{sentence}"
        elif kind == 5:
            name, para = passages[i % len(passages)]
            text = f"Summarize the following text in one or two sentences:\n\n{para}"
        elif kind == 6:
            name, para = passages[(i * 7) % len(passages)]
            text = (f"Use the document below to answer the question.\n\nDocument:\n{para}\n\n"
                    f"Question: What does `{name.rsplit('.', 1)[-1]}` do, according to the document?")
        else:
            task = rng.choice(CODE_TASKS)
            text = rng.choice([f"Write a Python function that {task}.",
                               f"Write a Python function that {task}, with a docstring and an example.",
                               f"How would you write a Python program that {task}? Explain the code."])
        prompts.append([{"role": "user", "content": text}])
    return prompts


# -- self-instruct: the target writes the user requests it is then asked to answer --------------

# Written for this file, none from the held-out benchmark (a test checks; the shipped drafters'
# requests were drawn while one benchmark QA prompt was still in this list, shown but never
# answered: see their model cards); shown four at a time as the start of
# a numbered list that the target continues. A small instruct model does not follow "write a
# question" meta-instructions, but it continues a list of requests in kind.
EXAMPLE_REQUESTS = [
    "How can I keep my cat from scratching the sofa?",
    "Write a short speech for my brother's wedding that is funny but kind.",
    "What is the difference between a virus and a bacterium?",
    "I have an interview for a bank job tomorrow. What questions should I prepare for?",
    "My tomato plants have brown spots on the leaves. What could be wrong?",
    "Can you suggest a weekly workout plan for someone who has never exercised?",
    "Write a thank-you note to a teacher who helped me with my exams.",
    "Why do onions make people cry when they cut them?",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Give me three ideas for a birthday present for my father, who likes fishing.",
    "How do I explain to my manager that I need more time for a project?",
    "What are the pros and cons of working from home?",
    "Write a short poem about autumn leaves.",
    "How does a credit score work, and how can I improve mine?",
    "What is a healthy breakfast I can make in five minutes?",
    "Explain how vaccines train the immune system, in simple words.",
    "I want to learn to play the guitar. Where should I start?",
    "Describe the main causes of the First World War.",
    "How can I save money on groceries without eating badly?",
    "Write a product description for a reusable water bottle.",
    "What are some good ways to make new friends after moving to a new city?",
    "How do airplanes stay in the air?",
    "Suggest a name and a slogan for a small bakery.",
    "My neighbour plays loud music late at night. How should I talk to them about it?",
    "What is the best way to study for a history exam?",
    "Summarize the plot of a typical detective story in a few sentences.",
    "How do I make a simple tomato sauce from scratch?",
    "Compare living in a big city with living in the countryside.",
    "Write a polite email to a landlord asking for a repair.",
    "Why is the sky blue during the day and red at sunset?",
    "What are the first steps to start a small online business?",
    "Give me tips for staying calm before a presentation.",
]


def request_list_prompts(count: int, seed: int = 0, shown: int = 4) -> list[str]:
    """`count` raw-text prompts, each the start of a numbered list of user requests (`shown`
    seeded examples) that ends at the next item's number, for the target to continue."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        examples = rng.sample(EXAMPLE_REQUESTS, shown)
        lines = "".join(f"{i + 1}. {e}\n" for i, e in enumerate(examples))
        out.append("Here is a list of requests that users sent to a helpful AI assistant, on many "
                   f"different subjects.\n\n{lines}{shown + 1}.")
    return out


def parse_listed_requests(text: str, seen: set | None = None) -> list[str]:
    """The well-formed requests in a continuation of `request_list_prompts`: one per list item,
    a question or sentence of 20-240 characters ending in '?' or '.', new (case-insensitively)
    to `seen` and to the shown examples; `seen` is updated."""
    seen = set() if seen is None else seen
    known = {e.lower() for e in EXAMPLE_REQUESTS}
    out = []
    for item in re.split(r"\n\s*\d+\.\s*", "\n" + text.strip().split("\n\n")[0]):
        item = item.strip()
        if not (20 <= len(item) <= 240) or item[-1] not in "?." or "\n" in item:
            continue
        if item[0].isdigit() or not item[0].isalpha():
            continue
        key = item.lower()
        if key in seen or key in known:
            continue
        seen.add(key)
        out.append(item)
    return out


SUMMARY_INSTRUCTIONS = ["Summarize the following text in one or two sentences:",
                        "Write a short summary of this passage:",
                        "What is the main point of the text below? Answer briefly.",
                        "Summarize the text below for a busy reader:"]


def passage_prompts(passages: list[str], count: int, seed: int = 0) -> list[list[dict]]:
    """Summarization, retrieval-augmented QA and translation conversations over `passages`
    (e.g. paragraphs the target wrote for an earlier corpus), deterministic in `seed`."""
    if not passages:
        raise ValueError("passage_prompts needs at least one passage")
    rng = random.Random(seed)
    sentences = [s for p in passages for s in re.split(r"(?<=[.!?])\s+", p)
                 if 40 <= len(s) <= 160 and s[0].isupper() and "\n" not in s]
    out = []
    for i in range(count):
        passage = rng.choice(passages)
        kind = i % 3
        if kind == 0:
            text = f"{rng.choice(SUMMARY_INSTRUCTIONS)}\n\n{passage}"
        elif kind == 1:
            t = rng.choice(TOPICS)
            question = rng.choice(QUESTIONS).format(t=t)
            text = (f"Answer the question using the information in the passage.\n\nPassage:\n{passage}"
                    f"\n\nQuestion: {rng.choice(['What does the passage say about its subject?', question])}")
        else:
            sentence = rng.choice(sentences) if sentences else passage[:160]
            text = f"Translate the following English text into {rng.choice(LANGUAGES)}:\n\n{sentence}"
        out.append([{"role": "user", "content": text}])
    return out
