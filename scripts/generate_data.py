#!/usr/bin/env python3
"""Write N seeded records shaped like the real workload: IPA transcriptions with embeddings.

    python scripts/generate_data.py --count 100000 --out data/words.jsonl.gz

Each line: {"ipa_id": "w0000042", "word": ..., "ipa": ..., "language": ...,
"frequency": ..., "embedding": [384 floats]}. The same seed gives the same bytes.
"""

import argparse
import gzip
import random
import struct
import sys

import orjson

SYLLABLES = ["ka", "to", "ri", "sha", "ne", "lu", "mo", "pi", "zen", "dra", "vo", "thi", "gle", "ba", "qu"]
IPA = {"a": "ɑ", "e": "ɛ", "i": "ɪ", "o": "ɔ", "u": "ʊ", "sh": "ʃ", "th": "θ", "r": "ɹ", "ng": "ŋ", "q": "k"}
LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "sv", "pl", "pt", "fi"]
SCALE = 1 / 32768


def to_ipa(word: str) -> str:
    text = word
    for letters, symbol in IPA.items():
        text = text.replace(letters, symbol)
    return f"/{text}/"


def make_record(rng: random.Random, number: int, dims: int) -> dict:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    # Six decimals of a 16-bit draw: the length of a float32 written by a typical embedding pipeline.
    raw = struct.unpack(f"{dims}h", rng.randbytes(2 * dims))
    return {"ipa_id": f"w{number:08d}", "word": word, "ipa": to_ipa(word), "language": rng.choice(LANGUAGES),
            "frequency": rng.randint(1, 1_000_000), "embedding": [round(v * SCALE, 6) for v in raw]}


def make_tiny_record(rng: random.Random, number: int) -> dict:
    """About 32 bytes: stresses the per-document cost of a client."""
    return {"ipa_id": f"w{number:08d}", "n": rng.randint(0, 9999)}


def write_records(out, count: int, dims: int, seed: int, start: int = 0, tiny: bool = False) -> None:
    rng = random.Random(seed)
    opener = gzip.open if out.endswith(".gz") else open
    with opener(out, "wb") as handle:
        for number in range(start, start + count):
            record = make_tiny_record(rng, number) if tiny else make_record(rng, number, dims)
            handle.write(orjson.dumps(record) + b"\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="records to write [100000]")
    parser.add_argument("--dims", type=int, default=384, help="embedding dimensions [384]")
    parser.add_argument("--seed", type=int, default=42, help="random seed [42]")
    parser.add_argument("--start", type=int, default=0, help="number of the first ipa_id [0]")
    parser.add_argument("--tiny", action="store_true", help="~32-byte records (ipa_id and a number) instead")
    parser.add_argument("--out", required=True, help="output file; .gz compresses")
    args = parser.parse_args(argv)
    write_records(args.out, args.count, args.dims, args.seed, args.start, args.tiny)
    print(f"wrote {args.count} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
