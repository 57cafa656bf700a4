"""Property-based fuzzing of the decode boundary (hypothesis): mutated images and DICOM headers never escape as
anything but an ImageReadError with one line, and whatever decodes is a sane grey image.

Seed corpus: the generated hostile files (always) plus ../shared/data/hostile-inputs when present. Bounded by
example counts, never by wall time, so every example drawn is checked: MUTATED_EXAMPLES mutated files and
DICOM_EXAMPLES DICOM headers (about half a minute in all on a 2-core CI machine); FUZZ_EXAMPLES=15000 runs ten
times as many of both for a long local run. Random examples locally (a new draw each run, to keep finding
inputs); in CI (CI=true) the same draw every run, so that CI is red on the code, never on the luck of a draw
(hypothesis' derandomize). A failure found locally becomes a plain test (e.g. test_decode.py's IS-range test).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cxr_triage.core import limits
from cxr_triage.core.decode import load_grey
from cxr_triage.core.errors import ImageReadError
from tests.hostile_corpus import CORPUS, PATIENT, dicom, shared_hostile_files

MUTATED_EXAMPLES, DICOM_EXAMPLES = 1500, 200
SCALE = float(os.environ.get("FUZZ_EXAMPLES", str(MUTATED_EXAMPLES))) / MUTATED_EXAMPLES
SEEDS: dict[str, bytes] = {name: make() for name, (make, _) in CORPUS.items() if name != "empty.png"}
SEEDS |= {f"shared/{p.name}": p.read_bytes() for p in shared_hostile_files() if p.stat().st_size < 400_000}
NAMES = sorted(SEEDS)
QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FUZZ = {"deadline": None, "database": None, "suppress_health_check": QUIET, "derandomize": IN_CI}
FUZZ_FILES = settings(max_examples=int(MUTATED_EXAMPLES * SCALE), **FUZZ)
FUZZ_TAGS = settings(max_examples=int(DICOM_EXAMPLES * SCALE), **FUZZ)


def check(data: bytes, name: str) -> None:
    """The property: a sane grey image, or one ImageReadError line without patient data."""
    try:
        grey = load_grey(data, name=name)
    except ImageReadError as exc:
        text = str(exc)
        assert text and "\n" not in text and "Traceback" not in text and len(text) < 400, text
        assert PATIENT not in text and "Doe" not in text, text
        return
    assert isinstance(grey, np.ndarray) and grey.dtype == np.uint8 and grey.ndim == 2
    assert min(grey.shape) >= limits.MIN_SIDE and grey.size <= limits.MAX_PIXELS


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed file with a few byte edits, mostly in its first 2 KB where the headers are."""
    name = draw(st.sampled_from(NAMES))
    data = bytearray(SEEDS[name])
    edits = st.tuples(
        st.sampled_from(["set", "xor", "cut", "insert", "delete"]),
        st.integers(0, 2**31 - 1),
        st.booleans(),
        st.binary(min_size=1, max_size=8),
    )
    for op, pos, in_header, blob in draw(st.lists(edits, min_size=1, max_size=6)):
        if not data:
            break
        i = pos % (min(len(data), 2048) if in_header else len(data))
        if op == "set":
            data[i : i + len(blob)] = blob
        elif op == "xor":
            data[i] ^= blob[0] or 0xFF
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = blob
        else:
            del data[i : i + blob[0] % 64 + 1]
    return name.removeprefix("shared/"), bytes(data)


FIELDS = [
    "Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
    "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration", "WindowCenter", "WindowWidth",
    "RescaleSlope", "RescaleIntercept", "VOILUTFunction",
]  # fmt: skip
VALUES = st.one_of(
    st.integers(-(2**31), 2**32),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "SIGMOID", "LINEAR_EXACT", ""]),
)


@FUZZ_FILES
@given(case=mutated())
def test_mutated_files_never_escape_the_boundary(case: tuple[str, bytes]):
    check(case[1], case[0])


@FUZZ_TAGS
@given(tags=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=4))
def test_dicom_header_values_never_escape_the_boundary(tags: dict[str, object]):
    try:
        data = dicom(**tags)
    except Exception:  # a value pydicom cannot even write: nothing to read
        assume(False)
    check(data, "fuzz.dcm")
