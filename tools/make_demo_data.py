"""Generate data/demo/*.jsonl: the demo task, structured extraction of a person into one JSON line.

    python tools/make_demo_data.py [--out data/demo] [--seed 1234]

The user message is a short sentence (or two) about a fictional person; the answer is ONE line of
JSON with the keys of ANSWER_KEYS in that order, e.g.
    {"name": "Mira Castellan", "age": 34, "city": "Lisbon", "job": "baker"}
"city" is where the person lives or works now; distractor sentences add other numbers, a birthplace
or another city, and other jobs, so the answer has to be extracted, not copied by position.

Train and valid rows come from disjoint pools (first names, surnames, jobs, sentence templates,
distractors), so held-out scores measure generalisation. Output is a pure function of the seed:
Python's `random.Random` with a fixed seed, no set iteration, no clock - the committed files are
byte-identical to a fresh run (tests/forge_core/test_metrics.py checks it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from forge_core.atomic import write_text

SEED = 1234
ANSWER_KEYS = ("name", "age", "city", "job")
SYSTEM = 'Answer with one JSON line only, keys in order: "name", "age" (a number), "city" (where they live now), "job".'
COUNTS = {"sft_train": 200, "sft_valid": 40, "dpo_train": 150, "dpo_valid": 30, "grpo_train": 200}

FIRST = {
    "train": ["Mira", "Tobin", "Elsa", "Rafe", "Noor", "Idris", "Calla", "Bram", "Sunniva", "Oskar",
              "Petra", "Linus", "Amara", "Dario", "Freya", "Joaquin", "Ilse", "Kasim", "Lorna", "Matteo",
              "Nadia", "Orrin", "Priya", "Quentin", "Rosalind", "Soren", "Talia", "Ulric", "Vesna",
              "Wendell", "Yara", "Zeno", "Anouk", "Benedikt", "Cosima", "Desmond", "Esme", "Faris",
              "Greta", "Hugo"],
    "valid": ["Isolde", "Jasper", "Kirra", "Leander", "Marisol", "Nikolai", "Ottilie", "Pavel", "Rhea",
              "Severin", "Thea", "Viggo", "Wilhelmina", "Xavi", "Ysolde"],
}
SURNAME = {
    "train": ["Castellan", "Ashgrove", "Brenner", "Quill", "Halloran", "Marchetti", "Okonkwo", "Vantreight",
              "Lindqvist", "Demarco", "Fairbairn", "Ostrander", "Pellegrin", "Ravensworth", "Szabo",
              "Thornbury", "Underhill", "Varga", "Whitlock", "Yilmaz", "Abernathy", "Blackwood", "Corvell",
              "Delacroix", "Eberhardt", "Falkner", "Gallardo", "Hawthorne", "Ingersoll", "Jovanovic",
              "Kettleby", "Lachance", "Mbeki", "Northcott", "Oyelaran", "Penhallow", "Rasmussen", "Stroud",
              "Tamsin", "Vell"],
    "valid": ["Aldridge", "Brightwater", "Crane", "Dunmore", "Everly", "Fenwick", "Grisham", "Holt",
              "Ivers", "Kestrel", "Larkspur", "Moreau", "Nightingale", "Pembury", "Quarrington"],
}
CITY = {
    "train": ["Lisbon", "Oslo", "Montreal", "Nairobi", "Osaka", "Valparaiso", "Krakow", "Adelaide", "Porto",
              "Tallinn", "Bergen", "Leeds", "Seville", "Ghent", "Hanoi", "Cork", "Tucson", "Graz", "Lyon",
              "Bilbao", "San Diego", "Cape Town", "Buenos Aires", "Kuala Lumpur", "Salt Lake City",
              "Hamburg", "Dublin", "Wellington", "Quito", "Tampere"],
    "valid": ["Rotterdam", "Trieste", "Halifax", "Mombasa", "Sapporo", "Cordoba", "Gdansk", "Hobart",
              "Santa Fe", "Le Havre", "Aarhus", "Bratislava"],
}
JOB = {
    "train": ["baker", "nurse", "carpenter", "software engineer", "violin teacher", "bus driver", "architect",
              "florist", "pharmacist", "plumber", "librarian", "chef", "electrician", "accountant",
              "photographer", "veterinarian", "translator", "dentist", "tailor", "gardener", "pilot",
              "journalist", "optician", "welder", "zookeeper"],
    "valid": ["beekeeper", "surveyor", "midwife", "locksmith", "sound engineer", "ferry captain",
              "glassblower", "paramedic", "cartographer", "upholsterer"],
}

# Main sentences. {name} {first} {age} {city} {job} {a_job} ("a baker" / "an architect").
TEMPLATES = {
    "train": [
        "{name} is {age} years old and lives in {city}, where {first} works as {a_job}.",
        "Meet {name}, {a_job} from {city}. {first} is {age}.",
        "{name}, {age}, works as {a_job} in {city}.",
        "Hi, I'm {name}. I'm {age}, I live in {city} and I work as {a_job}.",
        "In {city} lives {name}, {a_job} aged {age}.",
        "{name} ({age}) has been {a_job} in {city} for a few years.",
        "Our new neighbour is {name}, a {age}-year-old {job} who just moved to {city}.",
        "Customer record: {name}, age {age}, based in {city}, occupation {job}.",
        "{first} {last} is {a_job}. {first} is {age} and lives in {city}.",
        "You can find {name} in {city}; {first} is {a_job} and turned {age} this year.",
        "At {age}, {name} is the busiest {job} in {city}.",
        "{name} lives in {city}. Age: {age}. Job: {job}.",
        "My cousin {name} is {age} now and works as {a_job} up in {city}.",
        "The {job} {name}, {age} years of age, resides in {city}.",
        "{name} - {job}, {age}, {city}.",
        "Ask {name} about {city}: the {age}-year-old {job} has lived there for ages.",
        "Profile: {name} is {a_job} living in {city}, {age} years old.",
        "{city} is home to {name}, {a_job} who is {age}.",
        "Please register {name} ({job}, {age}) at the {city} office.",
        "Working as {a_job} in {city}, {name} is {age} years old.",
        "{name} is {age}. {first} works in {city} as {a_job}.",
        "Last week I met {name}, {a_job} in {city}, who is {age}.",
        "New member: {name}. Lives in {city}, is {age}, works as {a_job}.",
        "{name} turned {age} in March and still works as {a_job} in {city}.",
    ],
    "valid": [
        "{name}, {a_job} who calls {city} home, is {age}.",
        "Say hello to {name}! {first} is {age} and works as {a_job} over in {city}.",
        "Employee file - name: {name}; residence: {city}; age {age}; role: {job}.",
        "{name} makes a living as {a_job} in {city} and is {age} years old.",
        "Born {age} years ago, {name} now lives in {city} and works as {a_job}.",
        "These days {name} ({age}) is {a_job} in {city}.",
        "I'm told {name} is {a_job}; {first} is {age} and settled in {city}.",
        "{name} lives and works in {city} as {a_job}, aged {age}.",
    ],
}

# Extra sentences: other numbers, places and jobs that are NOT the answer.
# {first} {n} (2-9) {year} (2003-2021) {kid} (3-17, a child's age) {city2} {a_job2}.
DISTRACTORS = {
    "train": [
        "{first} has {n} cats.",
        "{first} was born in {city2}.",
        "{first} started the current job in {year}.",
        "{first}'s father was {a_job2}.",
        "{first} runs {n} km every morning.",
        "{first} grew up in {city2}.",
        "{first} visits {city2} every summer.",
        "{first} owns {n} bicycles.",
        "{first} moved there in {year}.",
        "{first} once trained as {a_job2}.",
        "{first}'s son is {kid}.",
    ],
    "valid": [
        "{first} has {n} siblings.",
        "{first} spent a year in {city2} in {year}.",
        "{first}'s best friend is {a_job2}.",
        "{first} plays chess {n} times a week.",
        "{first} studied in {city2}.",
        "{first} has a {kid}-year-old daughter.",
    ],
}


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def answer(person: dict) -> str:
    """The one-line JSON answer: ANSWER_KEYS in order, json.dumps's default separators."""
    return json.dumps({k: person[k] for k in ANSWER_KEYS})


def draw_person(rng: random.Random, split: str, used: set) -> dict:
    """A fresh person (a full name not used before in any file of this split) with its distractor pools."""
    while True:
        first, last = rng.choice(FIRST[split]), rng.choice(SURNAME[split])
        if f"{first} {last}" not in used:
            break
    used.add(f"{first} {last}")
    city, job = rng.choice(CITY[split]), rng.choice(JOB[split])
    return {
        "name": f"{first} {last}", "first": first, "last": last, "age": rng.randint(19, 78),
        "city": city, "job": job,
        "city2": rng.choice([c for c in CITY[split] if c != city]),
        "job2": rng.choice([j for j in JOB[split] if j != job]),
    }


def user_message(rng: random.Random, split: str, p: dict) -> str:
    """One template, and with probability 0.6 one distractor sentence before or after it."""
    fields = dict(p, a_job=article(p["job"]), a_job2=article(p["job2"]),
                  n=rng.randint(2, 9), year=rng.randint(2003, 2021), kid=rng.randint(3, 17))
    text = rng.choice(TEMPLATES[split]).format(**fields)
    if rng.random() < 0.6:
        extra = rng.choice(DISTRACTORS[split]).format(**fields)
        text = f"{extra} {text}" if rng.random() < 0.3 else f"{text} {extra}"
    return text


def prompt_messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def rejected_answer(rng: random.Random, p: dict, kind: str) -> str:
    """A plausible but wrong reply of the given kind (DPO 'rejected'); never equal to the answer."""
    right = {k: p[k] for k in ANSWER_KEYS}
    if kind == "wrong_value":
        field = rng.choice(ANSWER_KEYS)
        wrong = {"name": p["first"], "age": p["age"] + rng.choice([-7, -3, -1, 1, 2, 5, 10]),
                 "city": p["city2"], "job": p["job2"]}[field]
        return json.dumps(dict(right, **{field: wrong}))
    if kind == "prose":
        if rng.random() < 0.5:
            return f"{p['name']} is {p['age']} years old, lives in {p['city']} and works as {article(p['job'])}."
        return f"Here you go: {answer(p)}"
    if kind == "extra_keys":
        extra = rng.choice([{"hometown": p["city2"]}, {"first_name": p["first"]}, {"country": None}])
        return json.dumps(dict(right, **extra))
    if kind == "fence":
        return f"```json\n{answer(p)}\n```"
    # "wrong_keys": capitalised / renamed keys, a string age, or the keys out of order
    variant = rng.randrange(3)
    if variant == 0:
        return json.dumps({"Name": p["name"], "Age": p["age"], "Location": p["city"], "Occupation": p["job"]})
    if variant == 1:
        return json.dumps(dict(right, age=str(p["age"])))
    return json.dumps({k: p[k] for k in ("city", "name", "job", "age")})


REJECT_KINDS = ("wrong_value", "prose", "extra_keys", "fence", "wrong_keys")


def make_file(name: str, seed: int, used: set) -> list[dict]:
    """Rows of one output file; its own RNG (seeded by seed and file name) keeps files independent."""
    split = name.split("_")[1]
    rng = random.Random(f"{seed}:{name}")
    rows = []
    for i in range(COUNTS[name]):
        p = draw_person(rng, split, used)
        prompt = prompt_messages(user_message(rng, split, p))
        if name.startswith("sft"):
            rows.append({"messages": prompt + [{"role": "assistant", "content": answer(p)}]})
        elif name.startswith("grpo"):
            rows.append({"prompt": prompt, "reference": answer(p)})
        else:
            rejected = rejected_answer(rng, p, REJECT_KINDS[i % len(REJECT_KINDS)])
            assert rejected != answer(p), (name, i)
            rows.append({"prompt": prompt, "chosen": answer(p), "rejected": rejected})
    return rows


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """{file stem: rows} for all six files. Full names never repeat within a split (train / valid). GRPO's rows
    are prompts with their answer as the `reference` column the reward compares with: new people for training
    (the SFT adapter GRPO continues from has not seen them), the SFT held-out prompts for validation (so its
    numbers compare with the SFT demo's)."""
    used = {"train": set(), "valid": set()}
    files = {name: make_file(name, seed, used[name.split("_")[1]]) for name in COUNTS}
    files["grpo_valid"] = [{"prompt": r["messages"][:-1], "reference": r["messages"][-1]["content"]}
                           for r in files["sft_valid"]]
    return files


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "demo"))
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    for name, rows in build(args.seed).items():
        write_text(Path(args.out) / f"{name}.jsonl", to_jsonl(rows))
        print(f"wrote {len(rows)} rows to {Path(args.out) / name}.jsonl")


if __name__ == "__main__":
    main()
