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


def _long_docstrings(limit: int, rng: random.Random) -> list[tuple[str, str]]:
    """(name, docstring) pairs of 400-2500 characters from the standard library, shuffled."""
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
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and 400 <= len(doc) <= 2500:
                out.append((module if node is tree else f"{module}.{node.name}", doc.strip()))
        if len(out) >= limit:
            break
    return out[:limit]


def document_conversations(count: int = 400, seed: int = 1) -> list[list[dict]]:
    """Two-turn conversations whose answer is a standard-library docstring (not the target's
    words): features of text the target reads, labelled with what it would have said
    (`compute_features(..., labels=True)`), widen a drafter's training data cheaply, since a
    forward over given text costs far less per token than generating it."""
    rng = random.Random(seed)
    questions = ["What does `{n}` do?", "Explain `{n}`.", "Describe the purpose of `{n}`.",
                 "How do I use `{n}`?", "Give me an overview of `{n}`."]
    return [[{"role": "user", "content": rng.choice(questions).format(n=name)},
             {"role": "assistant", "content": doc}]
            for name, doc in _long_docstrings(count, rng)]
