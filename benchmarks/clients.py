"""The peer clients of the benchmark, one per subcommand, each run as its own process.

    python benchmarks/clients.py CLIENT URL INDEX FILE [--gzip] [--chunk N] [--threads N]

CLIENT: es-streaming, es-parallel (elasticsearch-py helpers.streaming_bulk and
parallel_bulk), os-streaming, os-parallel (opensearch-py's), minimal (orjson
parse, action line, optional gzip level 1, requests POST). Each prints one
JSON line: docs sent and errors.
"""

import argparse
import gzip
import sys

import orjson


def actions(path: str, index: str):
    """What a user of the helpers writes: parse each line, name index and _id."""
    with open(path, "rb") as handle:
        for line in handle:
            record = orjson.loads(line)
            yield {"_index": index, "_id": record["ipa_id"], "_source": record}


def run_helpers(module: str, helper: str, args) -> tuple[int, int]:
    if module == "es":
        from elasticsearch import Elasticsearch, helpers
        client = Elasticsearch(args.url, http_compress=args.gzip, request_timeout=120)
    else:
        from opensearchpy import OpenSearch, helpers
        client = OpenSearch([args.url], http_compress=args.gzip, timeout=120)
    stream = actions(args.file, args.index)
    if helper == "streaming":
        results = helpers.streaming_bulk(client, stream, chunk_size=args.chunk, raise_on_error=False,
                                         max_chunk_bytes=200 * 1024**2)
    else:
        results = helpers.parallel_bulk(client, stream, chunk_size=args.chunk, thread_count=args.threads,
                                        queue_size=args.threads, raise_on_error=False,
                                        max_chunk_bytes=200 * 1024**2)
    docs = errors = 0
    for ok, _ in results:
        docs += 1
        errors += not ok
    return docs, errors


def run_minimal(args) -> tuple[int, int]:
    import requests
    session, url = requests.Session(), args.url.rstrip("/") + "/_bulk?filter_path=errors"
    headers = {"Content-Type": "application/x-ndjson", **({"Content-Encoding": "gzip"} if args.gzip else {})}
    docs = errors = 0

    def post(lines):
        body = b"".join(lines)
        reply = session.post(url, data=gzip.compress(body, 1) if args.gzip else body, headers=headers)
        return int(reply.status_code != 200 or orjson.loads(reply.content).get("errors", False))

    with open(args.file, "rb") as handle:
        lines = []
        for line in handle:
            record = orjson.loads(line)
            lines += [orjson.dumps({"index": {"_index": args.index, "_id": record["ipa_id"]}}) + b"\n",
                      orjson.dumps(record) + b"\n"]
            docs += 1
            if len(lines) >= 2 * args.chunk:
                errors += post(lines)
                lines = []
        if lines:
            errors += post(lines)
    return docs, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("client", choices=["es-streaming", "es-parallel", "os-streaming", "os-parallel", "minimal"])
    parser.add_argument("url")
    parser.add_argument("index")
    parser.add_argument("file")
    parser.add_argument("--gzip", action="store_true", help="compress request bodies")
    parser.add_argument("--chunk", type=int, default=5000, help="documents per request [5000]")
    parser.add_argument("--threads", type=int, default=2, help="parallel_bulk threads [2]")
    args = parser.parse_args(argv)
    if args.client == "minimal":
        docs, errors = run_minimal(args)
    else:
        module, helper = args.client.split("-")
        docs, errors = run_helpers(module, helper, args)
    print(orjson.dumps({"docs": docs, "errors": errors}).decode())
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
