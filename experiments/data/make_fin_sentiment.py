"""Generate the fin-sentiment instruction dataset and the tiny-llama pretraining corpus.

    python experiments/data/make_fin_sentiment.py          # rewrites both files in place

Outputs (deterministic: fixed seeds, stdlib only, byte-identical on every run):

- `experiments/data/fin_sentiment.jsonl`: 400 rows with `instruction`, `input`, `output`,
  `task`. 270 are sentiment rows (90 each of negative / neutral / positive), 65 ask which
  company a headline is about, 65 ask for a four-to-five word summary.
- `qlora_ray/assets/tiny_corpus.txt`: 3000 lines of plain headlines, short news sentences
  and general statements of how investors read kinds of events ("When a company cuts
  jobs, investors see the news as negative."), for pretraining `builtin:tiny-llama`. No
  instruction format and no labelled headline, so the untrained model cannot answer the
  questions (its accuracy is at chance) and fine-tuning has something to learn; but, like
  a real base model, it knows the words and what they usually mean, which is what lets a
  model of half a million parameters learn the sentiment task from a few hundred rows with
  LoRA (r 8 on the attention projections, learning rate 2e-3, 3 epochs: from chance to
  about 85% when comparing the three label tokens' scores). With the 2e-4 of the QLoRA
  paper, meant for billion-parameter models, it barely moves in 3 epochs.

Every company is fictional. Headlines come from templates whose verb decides the
sentiment ("surges" -> positive, "plunges" -> negative, "holds steady" -> neutral), so the
mapping is learnable by a tiny model. Free-text answers are chosen so that only the three
sentiment words pass the `eval.labels: auto` rule (answers of at most three words seen at
least three times): company names are asked about at most twice each, and summaries
always have four or more words.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
CORPUS_SEED = 7
ROOT = Path(__file__).resolve().parents[2]
DATASET_PATH = ROOT / "experiments" / "data" / "fin_sentiment.jsonl"
CORPUS_PATH = ROOT / "qlora_ray" / "assets" / "tiny_corpus.txt"

ROWS_PER_SENTIMENT = 90
COMPANY_ROWS = 65
SUMMARY_ROWS = 65
CORPUS_HEADLINES = 1400
CORPUS_SENTENCES = 1000
CORPUS_KNOWLEDGE = 600

# sector -> (demand noun used in headlines, five fictional companies)
SECTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "energy": ("fuel", ("Northwind Energy", "Solaris Power", "Redrock Oil", "Bluewater Gas",
                        "Ironhill Utilities")),
    "banking": ("loan", ("Apex Bank", "Harbor Financial", "Crestview Capital", "Meridian Trust",
                         "Granite Savings")),
    "technology": ("cloud", ("Quantix Systems", "Vertiq Software", "Nimbus Cloud", "Pixelwave Labs",
                             "Corelink Networks")),
    "retail": ("consumer", ("Maple Stores", "Brightmart Retail", "Sunday Foods", "Cornerstone Grocers",
                            "Velvet Apparel")),
    "pharmaceuticals": ("drug", ("Helixa Pharma", "Curagen Biotech", "Medivo Health", "Novacare Labs",
                                 "Zenora Therapeutics")),
    "automotive": ("car", ("Torque Motors", "Everdrive Auto", "Piston Dynamics", "Voltra Electric",
                           "Roadstar Vehicles")),
    "airlines": ("travel", ("Skyline Airways", "Jetstream Air", "Polar Airlines", "Coastal Aviation",
                            "Horizon Jetways")),
    "mining": ("metal", ("Copperfield Mining", "Silverpeak Metals", "Deepcore Resources",
                         "Goldvale Minerals", "Basalt Quarries")),
}
COMPANIES = [(c, s) for s, (_, cs) in SECTORS.items() for c in cs]

QUARTERS = ("first-quarter", "second-quarter", "third-quarter", "fourth-quarter")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
MONTHS = ("March", "April", "May", "June", "September", "October", "November")
CITIES = ("London", "Frankfurt", "Chicago", "Toronto", "Singapore", "Zurich", "Dallas", "Sydney")

# (headline template, summary event). The summary is "<company> <event>": 4-5 words.
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "positive": [
        ("{c} shares surge {p}% after strong {q} results", "shares surge"),
        ("{c} beats forecasts as {d} demand rises", "beats forecasts"),
        ("{c} raises full-year outlook on record sales", "raises outlook"),
        ("{c} profit jumps {p}% in {q}", "profit jumps"),
        ("{c} wins ${b} billion contract", "wins contract"),
        ("{c} stock rallies after upgrade to buy", "stock rallies"),
        ("{c} lifts dividend by {p}%", "lifts dividend"),
        ("Investors cheer as {c} revenue climbs {p}%", "revenue climbs"),
    ],
    "negative": [
        ("{c} shares plunge {p}% after profit warning", "shares plunge"),
        ("{c} misses forecasts as costs soar", "misses forecasts"),
        ("{c} cuts {n} jobs amid weak {d} demand", "cuts jobs"),
        ("{c} profit falls {p}% in {q}", "profit falls"),
        ("{c} slashes dividend after heavy losses", "slashes dividend"),
        ("{c} stock slumps after downgrade to sell", "stock slumps"),
        ("Regulators open probe into {c} accounting", "faces probe"),
        ("{c} lowers full-year outlook on weak sales", "lowers outlook"),
    ],
    "neutral": [
        ("{c} holds steady ahead of {q} results", "holds steady"),
        ("{c} to report {q} earnings on {day}", "sets earnings date"),
        ("{c} names new chief financial officer", "names new CFO"),
        ("{c} shares flat as investors await rate decision", "shares flat"),
        ("{c} keeps full-year outlook unchanged", "keeps outlook"),
        ("{c} schedules annual shareholder meeting for {month}", "schedules meeting"),
        ("{c} moves headquarters to {city} as planned", "moves headquarters"),
        ("Analysts see {c} trading in line with {s} peers", "tracks peers"),
    ],
}
SUFFIXES = ("", "", "", " on {day}", " in early trading", " in {city}")

SENTIMENT_INSTRUCTIONS = (
    "Classify the sentiment of this financial headline as negative, neutral or positive.",
    "Is the sentiment of this headline negative, neutral or positive?",
    "What is the market sentiment of this news headline: negative, neutral or positive?",
)
COMPANY_INSTRUCTION = "Which company is this headline about?"
SUMMARY_INSTRUCTION = "Summarize this headline in a few words."

# Plain news sentences for the corpus only. The rating words appear in their ordinary
# finance sense (outlooks, ratings), never as a label attached to a headline.
CORPUS_SENTENCES_TEMPLATES = (
    "Shares of {c} rose {p}% on {day}.",
    "Shares of {c} fell {p}% on {day}.",
    "Shares of {c} were little changed on {day}.",
    "{c} is a {s} company based in {city}.",
    "{c} employs about {n} people in {city}.",
    "Analysts expect {c} to report {q} results in {month}.",
    "The {s} sector gained {p}% this week.",
    "The {s} sector lost {p}% this week.",
    "Ratings agency moves {c} outlook to positive.",
    "Ratings agency moves {c} outlook to negative.",
    "Broker rates {c} neutral with a steady outlook.",
    "Investors turned positive on {s} stocks in {month}.",
    "Investors turned negative on {s} stocks in {month}.",
    "Market sentiment on {c} stayed neutral before the results.",
    "{c} said {d} demand was strong last quarter.",
    "{c} said {d} demand was weak last quarter.",
    "{c} will hold its annual meeting in {city} in {month}.",
    "The company said its outlook was unchanged.",
    "Trading volume in {c} was higher than usual.",
    "The headline moved the stock in early trading.",
)


# How investors read each kind of event: general finance knowledge, the kind a real base
# model picks up in pretraining. Phrased about "a company", never about a headline, so the
# corpus holds no labelled rows; fine-tuning still has to learn to answer the question.
KNOWLEDGE: dict[str, tuple[str, ...]] = {
    "positive": ("shares surge", "beats forecasts", "raises its outlook", "profit jumps",
                 "wins a contract", "stock rallies", "lifts its dividend", "revenue climbs"),
    "negative": ("shares plunge", "misses forecasts", "cuts jobs", "profit falls",
                 "slashes its dividend", "stock slumps", "faces a probe", "lowers its outlook"),
    "neutral": ("holds steady", "sets an earnings date", "names a new finance chief", "shares are flat",
                "keeps its outlook unchanged", "schedules a meeting", "moves its headquarters",
                "trades in line with peers"),
}
KNOWLEDGE_FRAMES = (
    "When a company {e}, investors see the news as {s}.",
    "News that a company {e} is usually {s} for the stock.",
    "If a {sector} company {e}, analysts call it {s} news.",
)


def _fill(template: str, rng: random.Random, company: str, sector: str) -> str:
    values = {
        "c": company,
        "s": sector,
        "d": SECTORS[sector][0],
        "p": rng.choice((2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 18, 21, 25)),
        "b": rng.choice((1, 2, 3, 4, 5, 7)),
        "n": rng.choice((200, 300, 450, 600, 800, 1200, 1500, 2000, 3000)),
        "q": rng.choice(QUARTERS),
        "day": rng.choice(DAYS),
        "month": rng.choice(MONTHS),
        "city": rng.choice(CITIES),
    }
    return template.format(**values)


def _headline(rng: random.Random, sentiment: str, company: str, sector: str) -> tuple[str, str]:
    """(headline, summary) for one company and sentiment."""
    template, event = rng.choice(TEMPLATES[sentiment])
    headline = _fill(template + rng.choice(SUFFIXES), rng, company, sector)
    return headline, f"{company} {event}"


def make_rows(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(instruction: str, headline: str, output: str, task: str) -> bool:
        # Each headline once, whatever the question: the same headline under two
        # instructions would put an eval row's input in the training split.
        if headline in seen:
            return False
        seen.add(headline)
        rows.append({"instruction": instruction, "input": headline, "output": output, "task": task})
        return True

    for sentiment in ("negative", "neutral", "positive"):
        made = 0
        while made < ROWS_PER_SENTIMENT:
            company, sector = rng.choice(COMPANIES)
            headline, _ = _headline(rng, sentiment, company, sector)
            made += add(rng.choice(SENTIMENT_INSTRUCTIONS), headline, sentiment, "sentiment")

    # Each company is asked about at most twice, so no company name reaches the
    # three-occurrence threshold of `eval.labels: auto`.
    order = COMPANIES[:]
    rng.shuffle(order)
    made = 0
    while made < COMPANY_ROWS:
        company, sector = order[made % len(order)]
        headline, _ = _headline(rng, rng.choice(("negative", "neutral", "positive")), company, sector)
        made += add(COMPANY_INSTRUCTION, headline, company, "company")

    made = 0
    while made < SUMMARY_ROWS:
        company, sector = rng.choice(COMPANIES)
        headline, summary = _headline(rng, rng.choice(("negative", "neutral", "positive")), company, sector)
        made += add(SUMMARY_INSTRUCTION, headline, summary, "summary")

    rng.shuffle(rows)
    return rows


def make_corpus(seed: int = CORPUS_SEED) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(CORPUS_HEADLINES):
        company, sector = rng.choice(COMPANIES)
        sentiment = rng.choice(("negative", "neutral", "positive"))
        lines.append(_headline(rng, sentiment, company, sector)[0])
    for _ in range(CORPUS_SENTENCES):
        company, sector = rng.choice(COMPANIES)
        lines.append(_fill(rng.choice(CORPUS_SENTENCES_TEMPLATES), rng, company, sector))
    for _ in range(CORPUS_KNOWLEDGE):
        sentiment = rng.choice(("negative", "neutral", "positive"))
        frame = rng.choice(KNOWLEDGE_FRAMES)
        event, sector = rng.choice(KNOWLEDGE[sentiment]), rng.choice(list(SECTORS))
        lines.append(frame.format(e=event, s=sentiment, sector=sector))
    rng.shuffle(lines)
    return lines


def write(dataset_path: Path = DATASET_PATH, corpus_path: Path = CORPUS_PATH) -> None:
    dataset_path.parent.mkdir(parents=True, exist_ok=True)
    corpus_path.parent.mkdir(parents=True, exist_ok=True)
    with dataset_path.open("w", encoding="utf-8", newline="\n") as f:
        for row in make_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    corpus_path.write_text("\n".join(make_corpus()) + "\n", encoding="utf-8", newline="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DATASET_PATH, help="output .jsonl")
    parser.add_argument("--corpus", type=Path, default=CORPUS_PATH, help="output corpus .txt")
    args = parser.parse_args(argv)
    write(args.dataset, args.corpus)


if __name__ == "__main__":
    main()
