"""Four generated tasks with seeded train / validation / test splits and exact scorers.

Each task is short (prompt ~20 tokens, answer 1-25 tokens) so that a full fine-tune of a 135M base
fits a shared CPU, yet the base, asked through its chat template, rarely answers in the exact form.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLIT_SIZES = {"train": 1000, "val": 60, "test": 120}
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    """The system message: what to do and in which form to answer."""
    make: Callable[[random.Random], Example]
    score: Callable[[str, str], float]
    """score(prediction, answer) -> 1.0 or 0.0."""
    max_new_tokens: int


def exact_score(prediction: str, answer: str) -> float:
    return float(prediction.strip() == answer)


def json_score(prediction: str, answer: str) -> float:
    """1 when the prediction parses as JSON equal to the answer's object (key order and spacing free)."""
    try:
        return float(json.loads(prediction.strip()) == json.loads(answer))
    except json.JSONDecodeError:
        return 0.0


NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Yara",
]
SURNAMES = [
    "Lopez",
    "Smith",
    "Novak",
    "Khan",
    "Rossi",
    "Berg",
    "Silva",
    "Moreau",
    "Tanaka",
    "Okafor",
    "Fischer",
    "Costa",
    "Murphy",
    "Ivanova",
    "Dubois",
    "Park",
]
CITIES = [
    "Lyon",
    "Oslo",
    "Porto",
    "Leeds",
    "Graz",
    "Kyoto",
    "Lima",
    "Quebec",
    "Cork",
    "Turin",
    "Malmo",
    "Bergen",
    "Seville",
    "Krakow",
    "Austin",
    "Perth",
]
JOBS = [
    "nurse",
    "baker",
    "pilot",
    "teacher",
    "plumber",
    "chemist",
    "lawyer",
    "farmer",
    "dentist",
    "architect",
    "librarian",
    "welder",
    "painter",
    "surgeon",
]
COMPANIES = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Wonka",
    "Cyberdyne",
    "Tyrell",
    "Soylent",
    "Vandelay",
]
EMAIL_TEMPLATES = [
    "{first} {last} works at {company}.",
    "{first} {last}, {company}",
    "{company} hired {first} {last}.",
    "Contact: {first} {last} ({company})",
]


def make_email(rng: random.Random) -> Example:
    """A person and their employer -> first.last@company.com, all lower case."""
    first, last, company = rng.choice(NAMES), rng.choice(SURNAMES), rng.choice(COMPANIES)
    prompt = rng.choice(EMAIL_TEMPLATES).format(first=first, last=last, company=company)
    return Example(prompt, f"{first}.{last}@{company}.com".lower())


EXTRACT_TEMPLATES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "In {city}, {name} ({age}) has a job as a {job}.",
    "{name}, a {job} aged {age}, lives in {city}.",
]


def make_extraction(rng: random.Random) -> Example:
    """A sentence about a person -> compact JSON with name, age, city, job."""
    fields = {
        "name": f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}",
        "age": rng.randint(19, 79),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    prompt = rng.choice(EXTRACT_TEMPLATES).format(**fields)
    return Example(prompt, json.dumps(fields, separators=(",", ":")))


MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
ORDINAL_SUFFIX = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def make_date(rng: random.Random) -> Example:
    """A date written in words (three styles) -> YYYY-MM-DD."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name, ordinal = MONTHS[month - 1], f"{day}{ORDINAL_SUFFIX.get(day, 'th')}"
    prompt = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}", f"the {ordinal} of {name}, {year}"])
    return Example(prompt, f"{year:04d}-{month:02d}-{day:02d}")


DEPARTMENT_MESSAGES = {
    "billing": [
        "I was charged twice for {thing}.",
        "Why is my invoice for {thing} higher this month?",
        "Please refund the payment for {thing}.",
        "My card was billed for {thing} I cancelled.",
    ],
    "shipping": [
        "My {thing} has not arrived yet.",
        "Where is the parcel with my {thing}?",
        "The courier left my {thing} at the wrong door.",
        "Can you send the {thing} to a new address?",
    ],
    "technical": [
        "The {thing} app crashes when I open it.",
        "My {thing} will not connect to wifi.",
        "I get an error code when updating the {thing}.",
        "The {thing} screen stays black.",
    ],
    "account": [
        "I forgot the password for my {thing} login.",
        "Please change the email on my {thing} profile.",
        "How do I delete my {thing} account?",
        "I cannot sign in to {thing} since yesterday.",
    ],
}
THINGS = ["printer", "router", "tablet", "camera", "speaker", "watch", "laptop", "headset", "kettle", "drone"]
OPENERS = ["", "Hi. ", "Hello. ", "Urgent: ", "Quick question: ", "Good morning! "]
CLOSERS = ["", " Thanks.", " Please help.", " This is the second time.", " Reply soon."]


def make_routing(rng: random.Random) -> Example:
    """A customer message -> the one department that handles it."""
    department = rng.choice(sorted(DEPARTMENT_MESSAGES))
    message = rng.choice(DEPARTMENT_MESSAGES[department]).format(thing=rng.choice(THINGS))
    prompt = f"{rng.choice(OPENERS)}{message}{rng.choice(CLOSERS)}"
    return Example(prompt, department)


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("email", "Reply with the work email address.", make_email, exact_score, 16),
        Task("extraction", 'Reply with JSON: "name", "age", "city", "job".', make_extraction, json_score, 32),
        Task("dates", "Write the date as YYYY-MM-DD.", make_date, exact_score, 10),
        Task(
            "routing",
            "Reply with one department: billing, shipping, technical or account.",
            make_routing,
            exact_score,
            4,
        ),
    ]
}


def make_splits(task: Task, sizes: dict[str, int] | None = None) -> dict[str, list[Example]]:
    """Disjoint splits by prompt: test first, then val, then train, each skipping prompts already taken."""
    sizes = sizes or SPLIT_SIZES
    taken: set[str] = set()
    splits: dict[str, list[Example]] = {}
    for split in ["test", "val", "train"]:
        splits[split] = _draw_unique(task, random.Random(f"{task.name}/{SPLIT_SEEDS[split]}"), sizes[split], taken)
    return splits


def _draw_unique(task: Task, rng: random.Random, count: int, taken: set[str]) -> list[Example]:
    examples: list[Example] = []
    for _ in range(count * 50):
        if len(examples) == count:
            return examples
        example = task.make(rng)
        if example.prompt not in taken:
            taken.add(example.prompt)
            examples.append(example)
    raise ValueError(f"task {task.name!r}: could not draw {count} distinct prompts")
