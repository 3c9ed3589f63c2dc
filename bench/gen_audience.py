"""Write a synthetic French audience (CSV with ';', or JSONL) of N rows, deterministic per seed.

    python bench/gen_audience.py 1000000 /tmp/audience.csv [--seed 1] [--invalid 0.001]

Columns: numero_assure;prenom;nom;age;phone;email;push_token;date_limite. Phones come in the usual
French spellings (06 12 34 56 78, +33 6..., 07.xx...), some rows lack a phone, an email or a token,
and ``--invalid`` is the share of rows with a malformed phone or email. ``--complete`` gives every row
a phone, an email and a token (the single-channel scenarios of ``python -m bench``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from pathlib import Path

FIRST = [
    "Jean",
    "Marie",
    "Hélène",
    "Françoise",
    "Jérôme",
    "Chloé",
    "Benoît",
    "Zoé",
    "Léa",
    "Noël",
    "Gaëlle",
    "Michel",
    "Anne",
    "Pierre",
    "Sophie",
    "Raphaël",
    "Inès",
    "Océane",
    "Loïc",
    "Maëlle",
]
LAST = [
    "Martin",
    "Bernard",
    "Dubois",
    "Thomas",
    "Robert",
    "Petit",
    "Durand",
    "Leroy",
    "Moreau",
    "Simon",
    "Lefèvre",
    "Fontaine",
    "Rousseau",
    "Garçon",
    "Bœuf",
    "Girard",
    "André",
    "Mercier",
]
DOMAINS = ["exemple.fr", "courriel.example", "mail.example.org", "example.com"]


#: Assigned French mobile ranges (06 and 07), as in phonenumbers' metadata for FR.
MOBILE_PREFIXES = [f"6{d}" for d in "01245678"] + ["63", "69"] + [f"7{d}" for d in "3456789"]


def phone(rng: random.Random) -> str:
    prefix = rng.choice(MOBILE_PREFIXES)
    if prefix == "63":
        prefix += rng.choice("012345678")
    elif prefix == "69":
        prefix += rng.choice("589")
    digits = prefix + f"{rng.randrange(10**8):08d}"[: 9 - len(prefix)]
    style = rng.randrange(4)
    if style == 0:
        return "0" + digits
    if style == 1:
        return "0" + " ".join([digits[0]] + [digits[i : i + 2] for i in range(1, 9, 2)])
    if style == 2:
        return "+33" + digits
    return "0" + ".".join([digits[0:1] + digits[1:2]] + [digits[i : i + 2] for i in range(2, 9, 2)])


COLUMNS = ["numero_assure", "prenom", "nom", "age", "phone", "email", "push_token", "date_limite"]


def row(i: int, rng: random.Random, invalid: float, complete: bool = False) -> dict[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    has = rng.random()
    tel = phone(rng) if complete or has < 0.85 else ""
    mail = (
        f"{first.lower()}.{last.lower()}{i}@{rng.choice(DOMAINS)}" if complete or rng.random() < 0.7 else ""
    )
    mail = unicodedata.normalize("NFKD", mail).encode("ascii", "ignore").decode() if mail else ""
    token = f"fcm:{rng.getrandbits(128):032x}" if complete or rng.random() < 0.3 else ""
    if rng.random() < invalid:
        if rng.random() < 0.5:
            tel = "06 12 34"
        else:
            mail = f"{first.lower()}.{last.lower()}@"
    day = rng.randrange(1, 29)
    return {
        "numero_assure": f"{1_000_000_000 + i}",
        "prenom": first,
        "nom": last,
        "age": str(rng.randrange(18, 99)),
        "phone": tel,
        "email": mail,
        "push_token": token,
        "date_limite": f"2026-12-{day:02d}",
    }


def write_audience(
    path: Path, rows: int, seed: int = 1, invalid: float = 0.0, complete: bool = False
) -> dict[str, int]:
    """Write the audience; returns how many rows have a phone, an email, a token, and at least one."""
    rng = random.Random(seed)
    counts = {"phone": 0, "email": 0, "push_token": 0, "reachable": 0}
    with path.open("w", encoding="utf-8", newline="") as f:
        if path.suffix != ".jsonl":
            f.write(";".join(COLUMNS) + "\n")
        for i in range(rows):
            r = row(i, rng, invalid, complete)
            for key in ("phone", "email", "push_token"):
                counts[key] += bool(r[key])
            counts["reachable"] += bool(r["phone"] or r["email"] or r["push_token"])
            if path.suffix == ".jsonl":
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            else:
                f.write(";".join(r[c] for c in COLUMNS) + "\n")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("rows", type=int)
    ap.add_argument("path", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--invalid", type=float, default=0.0)
    ap.add_argument("--complete", action="store_true", help="every row has a phone, an email and a token")
    args = ap.parse_args()
    write_audience(args.path, args.rows, args.seed, args.invalid, args.complete)
    sys.stderr.write(f"wrote {args.rows:,} rows to {args.path}\n")


if __name__ == "__main__":
    main()
