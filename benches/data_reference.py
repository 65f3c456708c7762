#!/usr/bin/env python3
"""Python reference for `peftpipe bench data`: the same ingest + template work with pyarrow and
jinja2, so the bench can report a speed ratio.

    python3 benches/data_reference.py INPUT.parquet OUT_DIR [SEED]

Work (the same as the Rust run): read `text`, `label`; drop rows with a null or empty text or a
null label; drop duplicate texts (first occurrence kept); stratified 90/10 train/eval split by
label with exact per-label quotas and a seeded shuffle; write train/eval Parquet; render
prompt = "review: {{ text }}\\nsentiment:" and completion = " {{ label }}" per row with jinja2
(StrictUndefined) and write prompt/completion/text/label Parquet per split.
Prints one JSON line: {"wall_s": ..., "max_rss_kb": ..., "rows_kept": ...}.
"""
import json
import os
import resource
import sys
import time

import jinja2
import random
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    table = pq.read_table(source, columns=["text", "label"])
    keep = pc.and_(
        pc.and_(pc.is_valid(table["text"]), pc.is_valid(table["label"])),
        pc.greater_equal(pc.utf8_length(pc.fill_null(table["text"], "")), 1),
    )
    table = table.filter(keep)
    # Dedup on text, first occurrence wins.
    seen = set()
    first = []
    for index, text in enumerate(table["text"].to_pylist()):
        if text not in seen:
            seen.add(text)
            first.append(index)
    table = table.take(pa.array(first, type=pa.int64()))

    # Stratified 90/10 split with exact per-label quotas, seeded.
    rng = random.Random(seed)
    by_label = {}
    for index, label in enumerate(table["label"].to_pylist()):
        by_label.setdefault(label, []).append(index)
    train_index, eval_index = [], []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        n_eval = int(round(len(rows) * 0.1))
        eval_index.extend(rows[:n_eval])
        train_index.extend(rows[n_eval:])
    rng.shuffle(train_index)
    rng.shuffle(eval_index)

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    prompt_template = env.from_string("review: {{ text }}\nsentiment:")
    completion_template = env.from_string(" {{ label }}")
    for name, index in (("train", train_index), ("eval", eval_index)):
        split = table.take(pa.array(index, type=pa.int64()))
        pq.write_table(split, os.path.join(out, f"data-{name}.parquet"), compression="snappy")
        prompts, completions, texts = [], [], []
        for row in split.to_pylist():
            prompt = prompt_template.render(**row)
            completion = completion_template.render(**row)
            prompts.append(prompt)
            completions.append(completion)
            texts.append(prompt + completion)
        rendered = pa.table(
            {"prompt": prompts, "completion": completions, "text": texts, "label": split["label"]}
        )
        pq.write_table(rendered, os.path.join(out, f"{name}.parquet"), compression="snappy")

    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"wall_s": wall, "max_rss_kb": rss, "rows_kept": table.num_rows}))


if __name__ == "__main__":
    main()
