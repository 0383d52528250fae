"""The workload every mode serves: images of 1 to 4 tiles, questions, forced answer lengths,
and arrival schedules (Poisson at a rate, or a saturating closed loop).

Deterministic: request ``i`` of a workload depends only on the seed and ``i``, so every mode,
in this process or in the load-generator process, sees the very same requests. No torch here.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass

from PIL import Image

#: Tile grid (rows, cols) per tile count: exact multiples of the tile, so the Mllama image
#: processor picks exactly this grid (scale 1, smallest area on ties).
GRIDS = {1: (1, 1), 2: (1, 2), 3: (1, 3), 4: (2, 2)}
#: Share of requests per tile count; photos (4:3-ish, 4 tiles) are the most common.
TILE_WEIGHTS = {1: 0.2, 2: 0.25, 3: 0.15, 4: 0.4}
#: Answer lengths before ``length_scale``: log-normal, clipped to [16, 512] tokens.
ANSWER_MIN, ANSWER_MAX = 16, 512
ANSWER_MEDIAN, ANSWER_SIGMA = 230.0, 0.65

_ASKS = [
    "Describe this image in detail.",
    "What is happening in this picture, and who or what is involved?",
    "Read all the text visible in the image and summarise what it says.",
    "How many people are in this photo, and what are they doing?",
    "What objects are on the table, and what colour is each of them?",
    "Is there anything unusual or out of place in this scene? Explain why.",
    "Explain the chart: what does each axis show and what is the main trend?",
    "Which room of a house is this, and what suggests it?",
    "What time of day was this photo taken, judging from the light and shadows?",
    "Identify the main landmark in the picture and tell me where it is.",
    "What is the total amount on this receipt, and which items were bought?",
    "Compare the two sides of the image and list the differences you can see.",
]
_CONTEXT = [
    "I took this picture on my phone last weekend.",
    "This is for a report I am writing for my manager.",
    "My daughter drew this at school and I would like to understand it.",
    "The image comes from a scanned document that is a bit blurry.",
    "Please think step by step before you answer.",
    "Keep the answer short if you can, but do not leave out anything important.",
    "Answer in plain English and avoid technical jargon.",
    "If you are not sure about something, say so explicitly.",
]


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload."""

    index: int
    tiles: int
    question: str
    answer_tokens: int  # forced: the answer is exactly this long
    image_seed: int

    def image_size(self, tile_size: int) -> tuple[int, int]:
        """(width, height) in pixels for a tile of ``tile_size`` pixels."""
        rows, cols = GRIDS[self.tiles]
        return cols * tile_size, rows * tile_size


@dataclass(frozen=True)
class Workload:
    """The request stream: request ``i`` is :meth:`request` (``i``)."""

    seed: int = 0
    tile_size: int = 560
    length_scale: float = 1.0

    def request(self, index: int) -> RequestSpec:
        """Request ``index`` of the stream."""
        rng = random.Random(f"{self.seed}/request/{index}")
        tiles = rng.choices(list(TILE_WEIGHTS), weights=list(TILE_WEIGHTS.values()))[0]
        parts = [rng.choice(_ASKS)]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(_CONTEXT))
        return RequestSpec(
            index=index,
            tiles=tiles,
            question=" ".join(parts),
            answer_tokens=scaled_length(draw_answer_length(rng), self.length_scale),
            image_seed=rng.getrandbits(32),
        )

    def requests(self, n: int, start: int = 0) -> list[RequestSpec]:
        """Requests ``start`` .. ``start + n - 1``."""
        return [self.request(i) for i in range(start, start + n)]

    def image_bytes(self, spec: RequestSpec) -> bytes:
        """The request's image as JPEG bytes: a unique smooth random picture of its grid."""
        return make_image(spec.image_seed, spec.image_size(self.tile_size))

    def to_dict(self) -> dict:
        return asdict(self)


def draw_answer_length(rng: random.Random) -> int:
    """An unscaled answer length in [ANSWER_MIN, ANSWER_MAX] tokens."""
    value = rng.lognormvariate(math.log(ANSWER_MEDIAN), ANSWER_SIGMA)
    return int(min(max(round(value), ANSWER_MIN), ANSWER_MAX))


def scaled_length(tokens: int, scale: float) -> int:
    """``tokens`` times ``scale``, at least 1."""
    return max(1, round(tokens * scale))


def make_image(seed: int, size: tuple[int, int]) -> bytes:
    """A smooth random RGB image of ``size`` as JPEG bytes (fast to make, small to send)."""
    rng = random.Random(seed)
    small = Image.frombytes("RGB", (8, 6), bytes(rng.getrandbits(8) for _ in range(8 * 6 * 3)))
    image = small.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival offsets in seconds from 0 for a Poisson process of ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"{seed}/poisson/{rate:.6f}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def mean_answer_tokens(length_scale: float = 1.0, samples: int = 20000) -> float:
    """The mean forced answer length of the distribution, by sampling."""
    rng = random.Random("mean")
    total = sum(scaled_length(draw_answer_length(rng), length_scale) for _ in range(samples))
    return total / samples
