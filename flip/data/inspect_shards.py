"""Inspect a webdataset shard set with the training loader's own reader and checks.

    python -m flip.data.inspect_shards '/data/laion400m/{00000..00009}.tar'
    python -m flip.data.inspect_shards /data/my_shards --limit 10000

Prints: shards read and failed, samples good and skipped per reason (exactly what
``data=laion`` would skip), images converted to RGB by original mode, the image size
distribution, and the caption length distribution in words and in WordPiece tokens with
the share that the 32-token context truncates.
"""

import argparse
import itertools
import logging

import numpy as np

from flip.data.images import DEFAULT_MAX_PIXELS
from flip.data.shards import ShardStream, expand_shards
from flip.errors import DataError
from flip.tokenizer import Tokenizer


def percentiles(values, qs=(0, 5, 25, 50, 75, 95, 100)) -> str:
    if len(values) == 0:
        return "-"
    p = np.percentile(np.asarray(values), qs)
    return "  ".join(f"p{q}={v:g}" for q, v in zip(qs, p))


def inspect(
    shards,
    limit: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    context_length: int = 32,
) -> dict:
    """Statistics of one pass over ``shards`` (at most ``limit`` good samples)."""
    urls = expand_shards(shards)
    if not urls:
        raise DataError(f"{shards!r} matches no shard files")
    stream = ShardStream(
        urls,
        1,
        transform=lambda img: img,
        passes=1,
        shuffle_buffer=0,
        max_pixels=max_pixels,
        max_consecutive_bad=10**9,
    )
    widths, heights, captions = [], [], []
    for image, caption, _, _ in itertools.islice(stream.samples(), limit):
        widths.append(image.width)
        heights.append(image.height)
        captions.append(caption)
    tokens = Tokenizer(512)(captions) if captions else np.zeros((0, 512))
    token_lengths = (np.asarray(tokens) != 0).sum(axis=1)
    return {
        "urls": urls,
        "stats": stream.state.stats,
        "widths": widths,
        "heights": heights,
        "words": [len(c.split()) for c in captions],
        "tokens": token_lengths.tolist(),
        "truncated": float((token_lengths > context_length).mean()) if captions else 0.0,
        "context_length": context_length,
    }


def report(result: dict) -> str:
    stats = result["stats"]
    lines = [f"shard urls: {len(result['urls']):,} (first {result['urls'][0]})", stats.summary()]
    n = len(result["widths"])
    if n:
        lines += [
            f"image width  (px): {percentiles(result['widths'])}",
            f"image height (px): {percentiles(result['heights'])}",
            f"images under 224 px on the shorter side: "
            f"{100 * np.mean(np.minimum(result['widths'], result['heights']) < 224):.1f}%",
            f"caption words:     {percentiles(result['words'])}",
            f"caption tokens:    {percentiles(result['tokens'])}",
            f"captions longer than {result['context_length']} tokens (truncated): "
            f"{100 * result['truncated']:.1f}%",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flip.data.inspect_shards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("shards", help="brace pattern, '::'-joined patterns or a directory")
    parser.add_argument("--limit", type=int, help="stop after this many good samples")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    logging.getLogger("flip.data.shards").setLevel(logging.ERROR)  # the report lists skips
    try:
        result = inspect(args.shards, args.limit, args.max_pixels)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    print(report(result))
    if not result["widths"]:
        raise SystemExit(f"error: no readable sample in {args.shards}")


if __name__ == "__main__":
    main()
