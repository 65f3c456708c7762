"""Read a peftpipe train stage's TensorBoard event file with TensorBoard's own event reader and
check it against the stage's metrics.jsonl.

Loads the stage output folder with `EventAccumulator` (what `tensorboard --logdir` uses), which
checks the TFRecord framing and both CRC32Cs of every record and parses the protobuf `Event`s; a
record that fails its CRC ends the reading, so the scalars after it go missing and the comparison
below fails. Checks that the file version is `brain.Event:2`, that
the scalar tags are the expected ones, and that each tag's steps and values equal metrics.jsonl's
(as float32). Prints `ok: ...` on success.

Run by `cargo test --test train the_tensorboard_package_reads_the_event_file` when the Python it
uses (`PEFTPIPE_TENSORBOARD_PYTHON`, default python3) can import tensorboard; by hand:
    python3 -m venv /tmp/tb-venv && /tmp/tb-venv/bin/pip install tensorboard
    /tmp/tb-venv/bin/python tests/python/check_tensorboard.py .peftpipe/out/<pipeline>/<stage>
"""

import argparse
import json
import math
import struct
import sys
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator

TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "eval_loss": "eval/loss",
    "eval_perplexity": "eval/perplexity",
}
SMOOTHED = "train/loss_smoothed"


def f32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage_out", help="the train stage's output folder")
    args = parser.parse_args()
    out = Path(args.stage_out)
    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    if len(files) != 1:
        sys.exit(f"expected one event file under {out / 'tensorboard'}, found {files}")

    accumulator = event_accumulator.EventAccumulator(
        str(out / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    version = accumulator.file_version
    if version != 2.0:
        sys.exit(f"file_version {version!r}, expected brain.Event:2")

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    expected = {}
    average = weight = 0.0
    for line in lines:
        for field, tag in TAGS.items():
            value = line.get(field)
            if isinstance(value, (int, float)) and math.isfinite(value):
                expected.setdefault(tag, []).append((line["step"], f32(value)))
        if isinstance(line.get("loss"), (int, float)):
            average = 0.9 * average + 0.1 * line["loss"]
            weight = 0.9 * weight + 0.1
            expected.setdefault(SMOOTHED, []).append((line["step"], f32(average / weight)))

    tags = sorted(accumulator.Tags()["scalars"])
    if tags != sorted(expected):
        sys.exit(f"scalar tags {tags}, expected {sorted(expected)}")
    for tag, points in expected.items():
        events = accumulator.Scalars(tag)
        got = [(event.step, event.value) for event in events]
        if [step for step, _ in got] != [step for step, _ in points]:
            sys.exit(f"{tag}: steps {[s for s, _ in got]}, expected {[s for s, _ in points]}")
        for (step, value), (_, want) in zip(got, points):
            # The smoothed loss is computed in f64 by both sides, then rounded to f32.
            tolerance = 1e-6 * max(1.0, abs(want)) if tag == SMOOTHED else 0.0
            if abs(value - want) > tolerance:
                sys.exit(f"{tag} at step {step}: {value}, expected {want}")
    counts = ", ".join(f"{tag}: {len(points)}" for tag, points in sorted(expected.items()))
    print(f"ok: {files[0].name} read by tensorboard's EventAccumulator ({counts})")


if __name__ == "__main__":
    main()
