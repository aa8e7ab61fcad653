"""The twin's RFC 1624 checksum patch against a full recomputation.

``_csum_patch`` is the spec both datapaths follow (D26 in vswitch/datapath/pure.py): an
incremental update of a valid checksum must equal the checksum computed from scratch
over the changed data, and a partial (pseudo-header) sum must move like a full sum
that is not complemented. The expected values come from RFC 1071 computed here, in the
test, independently of the twin's own helpers.
"""
from hypothesis import given, settings
from hypothesis import strategies as st

from vswitch.datapath.pure import _csum_patch

words = st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=40)


def ones_complement_sum(ws):
    """RFC 1071 section 4.1: add 16-bit words with end-around carry, one word at a time."""
    total = 0
    for w in ws:
        total += w
        if total > 0xFFFF:
            total = (total & 0xFFFF) + 1
    return total


def full_checksum(ws):
    """RFC 1071: the ones' complement of the ones' complement sum."""
    return 0xFFFF ^ ones_complement_sum(ws)


def test_rfc1071_reference_matches_the_rfc_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2; checksum 220d
    ws = [0x0001, 0xF203, 0xF4F5, 0xF6F7]
    assert ones_complement_sum(ws) == 0xDDF2 and full_checksum(ws) == 0x220D


@settings(max_examples=300, deadline=None)
@given(words, st.data())
def test_incremental_update_equals_recomputation(ws, data):
    hc = full_checksum(ws)
    idx = data.draw(st.lists(st.integers(0, len(ws) - 1), min_size=1, max_size=8, unique=True))
    new = list(ws)
    for i in idx:
        new[i] = data.draw(st.integers(0, 0xFFFF))
    patched = _csum_patch(hc, [ws[i] for i in idx], [new[i] for i in idx])
    if any(new):
        # with non-zero data the ones' complement sum is unique: exact equality
        assert patched == full_checksum(new)
    else:
        # all-zero data: +0 and -0 are the same checksum
        assert patched in (0, 0xFFFF)


@settings(max_examples=300, deadline=None)
@given(words, st.data())
def test_partial_sum_update_is_the_uncomplemented_form(ws, data):
    partial = ones_complement_sum(ws)        # what a NEEDS_CSUM frame carries
    i = data.draw(st.integers(0, len(ws) - 1))
    new = list(ws)
    new[i] = data.draw(st.integers(0, 0xFFFF))
    patched = _csum_patch(partial, [ws[i]], [new[i]], partial=True)
    if any(new):
        assert patched == ones_complement_sum(new)


def test_rfc1624_example():
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    assert _csum_patch(0xDD2F, [0x5555], [0x3285]) == 0x0000


def test_order_of_words_does_not_matter():
    a = _csum_patch(0x1234, [1, 2, 0xFFFF], [0xABCD, 0, 7])
    b = _csum_patch(0x1234, [0xFFFF, 2, 1], [7, 0xABCD, 0])
    assert a == b
