"""PadCollator: property tests against a plain Python reference, every input form, dtypes and errors."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_loop as hl
from hf_loop.collate._fields import _list_buffers


def reference_pad(seqs, pad, side="right", multiple=None, max_length=None, truncation_side="right"):
    """The obvious Python padding, one token at a time: what PadCollator must equal."""
    if max_length is not None:
        seqs = [
            s[:max_length] if truncation_side == "right" else s[max(0, len(s) - max_length) :] for s in seqs
        ]
    width = max(len(s) for s in seqs)
    if multiple:
        width = (width + multiple - 1) // multiple * multiple
    out, mask = [], []
    for s in seqs:
        gap = width - len(s)
        out.append(s + [pad] * gap if side == "right" else [pad] * gap + s)
        mask.append([1] * len(s) + [0] * gap if side == "right" else [0] * gap + [1] * len(s))
    return out, mask


def as_input(rows, form):
    """The same batch as rows of lists, a columnar dict of arrays, tensors, or hl.Columns over Arrow."""
    if form == "rows":
        return rows
    names = list(rows[0])
    if form == "numpy":
        return {k: [np.array(r[k], dtype=np.int64) for r in rows] for k in names}
    if form == "torch":
        return [{k: torch.tensor(r[k], dtype=torch.long) for k in names} for r in rows]
    # Arrow with a non-zero offset: slice a longer array, as a take/slice of a table does
    columns = {
        k: pa.array([[7, 7]] + [r[k] for r in rows], type=pa.list_(pa.int64())).slice(1) for k in names
    }
    return hl.Columns(columns)


lengths_st = st.lists(st.integers(0, 40), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_st,
    side=st.sampled_from(["left", "right"]),
    truncation_side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    max_factor=st.one_of(st.none(), st.integers(1, 6)),
    form=st.sampled_from(["rows", "numpy", "torch", "arrow"]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_reference(lengths, side, truncation_side, multiple, max_factor, form, seed):
    rng = np.random.default_rng(seed)
    rows = [
        {"input_ids": rng.integers(0, 50, n).tolist(), "labels": rng.integers(0, 9, n).tolist()}
        for n in lengths
    ]
    max_length = None if max_factor is None else max_factor * (multiple or 1)
    collate = hl.PadCollator(
        {"input_ids": 3},
        pad_to_multiple_of=multiple,
        max_length=max_length,
        padding_side=side,
        truncation_side=truncation_side,
    )
    out = collate(as_input(rows, form))
    ids, mask = reference_pad([r["input_ids"] for r in rows], 3, side, multiple, max_length, truncation_side)
    labels, _ = reference_pad([r["labels"] for r in rows], -100, side, multiple, max_length, truncation_side)
    assert out["input_ids"].tolist() == ids and out["input_ids"].dtype == torch.int64
    assert out["labels"].tolist() == labels
    assert out["attention_mask"].tolist() == mask and out["attention_mask"].dtype == torch.int64


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=5),
    side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 4)),
)
def test_nd_fields_pad_every_ragged_dimension(shapes, side, multiple):
    rows = [{"boxes": np.arange(a * b, dtype=np.float32).reshape(a, b) + 1} for a, b in shapes]
    out = hl.PadCollator({"boxes": -1.0}, padding_side=side, pad_to_multiple_of=multiple)(rows)["boxes"]
    width = max(a for a, _ in shapes)
    width = -(-width // multiple) * multiple if multiple else width
    depth = max(b for _, b in shapes)
    assert out.shape == (len(rows), width, depth) and out.dtype == torch.float32
    for got, (a, b), row in zip(out, shapes, rows):
        expected = np.full((width, depth), -1.0, dtype=np.float32)
        if side == "right":
            expected[:a, :b] = row["boxes"]
        else:
            expected[width - a :, depth - b :] = row["boxes"]
        np.testing.assert_array_equal(got.numpy(), expected)


def test_scalars_strings_and_dtypes():
    rows = [
        {"input_ids": [1, 2], "label": 1, "score": 0.5, "flag": True, "id": "a", "half": np.float16(1)},
        {"input_ids": [3], "label": 0, "score": 1.5, "flag": False, "id": "b", "half": np.float16(2)},
    ]
    out = hl.PadCollator()(rows)
    assert out["label"].dtype == torch.int64 and out["label"].tolist() == [1, 0]
    assert out["score"].dtype == torch.float32 and out["score"].tolist() == [0.5, 1.5]
    assert out["flag"].dtype == torch.bool and out["id"] == ["a", "b"]
    assert out["half"].dtype == torch.float16
    floats = hl.PadCollator({"w": 0.0})({"w": [[0.5, 1.0], [2.0]], "input_ids": [[1, 2], [3]]})
    assert floats["w"].dtype == torch.float32 and floats["w"].tolist() == [[0.5, 1.0], [2.0, 0.0]]
    kept = hl.PadCollator({"w": 0})(
        {"w": [np.array([1, 2], dtype=np.float16), np.array([3], dtype=np.float16)]}
    )
    assert kept["w"].dtype == torch.float16
    flags = hl.PadCollator()({"flags": [[True, False], [True]]})["flags"]
    assert flags.dtype == torch.bool and flags.tolist() == [[True, False], [True, False]]
    words = hl.PadCollator()({"tokens": [["a", "b"], ["c"]], "input_ids": [[1, 2], [3]]})
    assert words["tokens"] == [["a", "b"], ["c"]]


def test_attention_mask_comes_from_positions_not_ids():
    rows = [{"input_ids": [0, 5, 0]}, {"input_ids": [0]}]  # pad id 0 appears inside real tokens (pad == eos)
    out = hl.PadCollator({"input_ids": 0})(rows)
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    own = hl.PadCollator()(
        [{"input_ids": [4, 5], "attention_mask": [1, 0]}, {"input_ids": [6], "attention_mask": [1]}]
    )
    assert own["attention_mask"].tolist() == [[1, 0], [1, 0]]  # the rows' own mask, padded with 0
    assert "attention_mask" not in hl.PadCollator(attention_mask=None)(rows)
    with pytest.raises(ValueError, match=r"'inputs_embeds' is ragged \(row 0 has 1 values, row 1 has 2\)"):
        hl.PadCollator()({"inputs_embeds": [[1.0], [2.0, 3.0]]})  # floats have no pad value: never guessed
    embeds = hl.PadCollator({"inputs_embeds": 0.0}, attention_mask="mask")(
        {"inputs_embeds": [np.ones((1, 2)), np.ones((3, 2))]}
    )
    assert embeds["mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_rectangular_fields_without_pad_value_are_stacked_unchanged():
    images = [np.full((3, 4, 4), i, dtype=np.uint8) for i in range(2)]
    out = hl.PadCollator(pad_to_multiple_of=8)({"pixel_values": images, "input_ids": [[1], [2, 3]]})
    assert out["pixel_values"].shape == (2, 3, 4, 4)
    assert out["input_ids"].shape == (2, 8)
    same = hl.PadCollator({"ids": None}, pad_to_multiple_of=4)({"ids": [[1, 2], [3, 4]]})
    assert same["ids"].tolist() == [[1, 2], [3, 4]]


def test_chunked_arrow_and_columnar_dicts():
    chunked = pa.chunked_array([pa.array([[1, 2, 3]]), pa.array([[4]])])
    out = hl.PadCollator()(hl.Columns({"input_ids": chunked, "labels": pa.array([1, 0])}))
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and out["labels"].tolist() == [1, 0]
    matrix = hl.PadCollator(pad_to_multiple_of=4)({"input_ids": np.array([[1, 2], [3, 4]])})
    assert matrix["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 0, 0]]
    assert hl.PadCollator()([]) == {}


def arrow_lists(rows, list_type, value_type, skip_rows, junk, child_offset):
    """``rows`` as an Arrow list array laid out the ways a real batch can be: ``skip_rows`` rows before it
    (taken away by ``arr.slice``), ``junk`` values before the first row's values in the child array, reached
    through the child's own offset (``child_offset``) or through offsets that do not start at zero."""
    before = [[9] * (i + 1) for i in range(skip_rows)]
    flat = [9] * junk + [v for row in before + rows for v in row]
    bounds = np.cumsum([0] + [len(row) for row in before + rows]).tolist()
    large = list_type is pa.large_list
    array_type = pa.LargeListArray if large else pa.ListArray
    if child_offset:
        values = pa.array(flat, type=value_type).slice(junk)
    else:
        values, bounds = pa.array(flat, type=value_type), [junk + b for b in bounds]
    whole = array_type.from_arrays(pa.array(bounds, type=pa.int64() if large else pa.int32()), values)
    return whole.slice(skip_rows, len(rows))


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 100), max_size=12), min_size=1, max_size=8),
    list_type=st.sampled_from([pa.list_, pa.large_list]),
    value_type=st.sampled_from([pa.int8(), pa.int32(), pa.int64(), pa.uint16()]),
    skip_rows=st.integers(0, 3),
    junk=st.integers(0, 5),
    child_offset=st.booleans(),
    split=st.integers(0, 8),
)
def test_arrow_buffers_read_directly_match_the_reference(
    rows, list_type, value_type, skip_rows, junk, child_offset, split
):
    arr = arrow_lists(rows, list_type, value_type, skip_rows, junk, child_offset)
    assert arr.to_pylist() == rows  # the layout is the batch it claims to be
    assert _list_buffers(arr) is not None  # np.frombuffer over the offsets and values, not the general path
    column = pa.chunked_array([arr.slice(0, split), arr.slice(split)]) if 0 < split < len(rows) else arr
    out = hl.PadCollator()(hl.Columns({"input_ids": column}))
    ids, mask = reference_pad(rows, 0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == ids and out["attention_mask"].tolist() == mask


def test_arrow_edge_layouts_match_the_reference():
    collate = hl.PadCollator(pad_values={"w": -1.0})
    cases = [
        [[], [], []],  # only empty lists: width 0
        [[3], [], [4, 5, 6], []],
    ]
    for rows in cases:
        for list_type in (pa.list_, pa.large_list):
            arr = arrow_lists(rows, list_type, pa.int32(), skip_rows=2, junk=3, child_offset=True)
            out = collate(hl.Columns({"input_ids": arr}))
            ids, mask = reference_pad(rows, 0)
            assert out["input_ids"].shape == (len(rows), max(map(len, rows)))
            assert out["input_ids"].tolist() == ids and out["attention_mask"].tolist() == mask
    floats = [[0.5, 1.5], [2.5], [3.5, 4.5, 5.5]]
    arr = arrow_lists(floats, pa.list_, pa.float32(), skip_rows=1, junk=2, child_offset=False)
    assert _list_buffers(arr) is not None
    assert collate(hl.Columns({"w": arr}))["w"].tolist() == reference_pad(floats, -1.0)[0]


def test_arrow_lists_with_nulls_take_the_general_path():
    # The child array has a validity bitmap and a null, but outside the rows of this batch: the buffer
    # reader steps aside (it cannot tell where the null is cheaply) and the general path pads the rows.
    values = pa.array([None, 1, 2, 3, 4, 5, None], type=pa.int64())
    arr = pa.ListArray.from_arrays(pa.array([1, 3, 3, 6], type=pa.int32()), values)
    assert _list_buffers(arr) is None
    out = hl.PadCollator()(hl.Columns({"input_ids": arr}))
    ids, mask = reference_pad([[1, 2], [], [3, 4, 5]], 0)
    assert out["input_ids"].tolist() == ids and out["attention_mask"].tolist() == mask
    # Null rows sliced away leave a validity bitmap without nulls: still the direct buffer read.
    sparse = pa.array([None, [7, 8], [9], None], type=pa.list_(pa.int32())).slice(1, 2)
    assert _list_buffers(sparse) is not None
    assert hl.PadCollator()(hl.Columns({"input_ids": sparse}))["input_ids"].tolist() == [[7, 8], [9, 0]]
    with pytest.raises(ValueError, match="field 'input_ids' holds null values inside its rows; fill them"):
        hl.PadCollator()(hl.Columns({"input_ids": pa.array([[1, None], [2]])}))
    chunked = pa.chunked_array([pa.array([[1]]), pa.array([None, [2]], type=pa.list_(pa.int64()))])
    with pytest.raises(ValueError, match=r"field 'input_ids', row 1 is null \(None\)"):
        hl.PadCollator()(hl.Columns({"input_ids": chunked}))


def test_for_tokenizer_matches_data_collator_with_padding(tokenizer):
    from transformers import DataCollatorWithPadding

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    rows = [dict(tok("w1 w2 w3 w4", return_token_type_ids=True)), dict(tok("w5", return_token_type_ids=True))]
    ours = hl.PadCollator.for_tokenizer(tok, pad_to_multiple_of=4)(rows)
    theirs = DataCollatorWithPadding(tok, pad_to_multiple_of=4)(copy.deepcopy(rows))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours[key].tolist() == theirs[key].tolist(), key
    labelled = hl.PadCollator.for_tokenizer(tok)(
        [{"input_ids": [5, 6], "labels": [1, 2]}, {"input_ids": [7], "labels": [3]}]
    )
    assert labelled["labels"].tolist() == [[1, 2], [-100, 3]]
    tok.pad_token = None
    with pytest.raises(
        ValueError, match=r"has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token"
    ):
        hl.PadCollator.for_tokenizer(tok)


def test_errors_name_the_field_and_the_row():
    collate = hl.PadCollator()
    with pytest.raises(ValueError, match="field 'b' is missing in row 1"):
        collate([{"a": 1, "b": 2}, {"a": 3}])
    with pytest.raises(ValueError, match="field 'c' is missing in row 0"):
        collate([{"a": 1}, {"a": 3, "c": 2}])
    with pytest.raises(
        ValueError, match=r"field 'w' is ragged \(row 0 has 2 values, row 1 has 1\).*pad_values=\{'w': 0.0\}"
    ):
        collate({"w": [[0.5, 1.0], [2.0]]})
    with pytest.raises(ValueError, match=r"field 'ids' is ragged.*its pad value is None"):
        hl.PadCollator({"ids": None})({"ids": [[1, 2], [3]]})
    with pytest.raises(TypeError, match=r"field 'input_ids' mixes dtypes: row 1 holds float 2.5"):
        collate([{"input_ids": [1, 2]}, {"input_ids": [2.5]}])
    with pytest.raises(
        TypeError, match=r"field 'input_ids', row 2: got str 'x' where int values are expected"
    ):
        collate({"input_ids": [[1], [2], [3, "x"]]})
    with pytest.raises(
        TypeError, match=r"field 'flags' mixes dtypes: row 1 holds int 2 but the field starts with bool"
    ):
        collate({"flags": [[True], [False, 2]]})
    with pytest.raises(TypeError, match=r"field 'label', row 1: got NoneType None"):
        collate({"label": [1, None]})
    with pytest.raises(TypeError, match=r"field 'm' mixes dtypes: row 0 is int64, row 1 is float32"):
        collate({"m": [np.zeros((2, 2), np.int64), np.zeros((2, 2), np.float32)]})
    with pytest.raises(ValueError, match=r"field 'input_ids', row 1 is null"):
        collate(hl.Columns({"input_ids": pa.array([[1], None])}))
    with pytest.raises(ValueError, match=r"field 'n', row 1: nested lists of uneven lengths"):
        collate({"n": [[[1, 2]], [[1, 2], [3]]]})
    with pytest.raises(
        TypeError, match="expected a list of row dicts, a dict of columns or hl.Columns, got list of int"
    ):
        collate([1, 2])


def test_configuration_errors():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'center'"):
        hl.PadCollator(padding_side="center")
    with pytest.raises(ValueError, match="max_length=10 is not a multiple of pad_to_multiple_of=4"):
        hl.PadCollator(max_length=10, pad_to_multiple_of=4)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        hl.PadCollator(pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="max_length must be an int, got bool True"):
        hl.PadCollator(max_length=True)  # a bool is not a length (bool() coercion would read it as 1)
    with pytest.raises(TypeError, match="pad_to_multiple_of must be an int, got str '8'"):
        hl.PadCollator(pad_to_multiple_of="8")
    with pytest.raises(TypeError, match="attention_mask must be a field name"):
        hl.PadCollator(attention_mask=False)
    with pytest.raises(ValueError, match="pad value 0.5 for the integer field 'input_ids' is not an integer"):
        hl.PadCollator({"input_ids": 0.5})({"input_ids": [[1], [2, 3]]})
    with pytest.raises(TypeError, match="pad value for field 'input_ids' must be a number, got str"):
        hl.PadCollator({"input_ids": "[PAD]"})({"input_ids": [[1], [2, 3]]})


def test_uint64_values_beyond_int64_are_refused_not_wrapped_negative():
    big = 2**63 + 5
    message = f"field 'id' holds {big}, above int64's maximum"
    collate = hl.PadCollator()
    for batch in (
        [{"id": big}, {"id": 1}],  # Python ints: numpy alone would make them float64
        {"id": np.array([big, 1], dtype=np.uint64)},
        hl.Columns({"id": pa.array([big, 1], pa.uint64())}),
        hl.Columns({"id": pa.array([[1, big], [2]], pa.list_(pa.uint64()))}),
        [{"id": [1, big]}, {"id": [2]}],
    ):
        with pytest.raises(ValueError, match=message):
            collate(batch)
    fits = collate(hl.Columns({"id": pa.array([[2**63 - 1], [7]], pa.list_(pa.uint64()))}))
    assert fits["id"].dtype == torch.int64 and fits["id"][0, 0].item() == 2**63 - 1
