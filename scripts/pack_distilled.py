"""Pack a `koala distill` output directory's text into the repo: a gzipped JSONL (records sorted by source
position) and a manifest, so heads can be re-trained without regenerating the text:

    .venv/bin/python scripts/pack_distilled.py runs/distill/sharegpt data/smollm2-135m/sharegpt
    koala cache --data data/smollm2-135m/sharegpt.jsonl.gz --out runs/cache/sharegpt   # hidden states again

(`koala cache` re-tokenises the text: ids can differ from the generated ones in rare spots, hidden states are
the target's own either way.)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a `koala distill --out` directory")
    p.add_argument("dest", help="output prefix: writes DEST.jsonl.gz and DEST.manifest.json")
    args = p.parse_args()
    src, dest = Path(args.src), Path(args.dest)
    manifest = json.loads((src / "manifest.json").read_text())
    records = [json.loads(line) for line in (src / "conversations.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: r["key"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    gz = dest.with_name(dest.name + ".jsonl.gz")
    with gzip.GzipFile(gz, "wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    meta = {k: v for k, v in manifest.items() if k not in ("shards", "format", "bytes")}
    meta.update({"file": gz.name, "records": len(records), "bytes": gz.stat().st_size,
                 "sha256": hashlib.sha256(gz.read_bytes()).hexdigest(),
                 "new_tokens": sum(sum(r["new_tokens"][r.get("context_turns", 0):]) for r in records),
                 "replies_cut_at_limit": sum(f == "length" for r in records
                                             for f in r["finish"][r.get("context_turns", 0):])})
    dest.with_name(dest.name + ".manifest.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("file", "records", "bytes", "new_tokens")}))


if __name__ == "__main__":
    main()
