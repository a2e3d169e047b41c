"""Half-precision banks coded as residuals to a k-means codebook (scio.index.bank)."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.conftest import make_net

import scio
import scio.index.bank as B
from scio import scores
from scio.index.bank import ResidualBank, append_rows, encode, kmeans, take_rows
from scio.recorder import Recorder
from scio.scores.core.calibration import CalibState
from scio.scores.utils import Index


def _blobs(n: int, d: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=generator) * 3 + 10  # far from 0: large values
    labels = torch.randint(0, 5, (n,), generator=generator)
    return centres[labels] + 0.05 * torch.randn(n, d, generator=generator)


def _stream(x: torch.Tensor, sizes: list[int], dtype: str = "float16") -> ResidualBank:
    state = CalibState()
    start = 0
    for size in sizes:
        append_rows(state, "f", x[start : start + size], dtype)
        start += size
    assert start == len(x)
    bank = take_rows(state, "f")
    assert isinstance(bank, ResidualBank)
    assert not any(name.startswith("f.") for name in state._parts)  # all parts freed
    return bank


def test_kmeans_finds_separated_clusters_deterministically() -> None:
    a, b = torch.zeros(20, 2), torch.full((30, 2), 5.0)
    a[:, 0] += torch.linspace(-0.1, 0.1, 20)
    centres = kmeans(torch.cat([a, b]), 2, iterations=5)
    found = sorted(centres.tolist())
    torch.testing.assert_close(torch.tensor(found), torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    x = _blobs(300)
    assert torch.equal(kmeans(x, 8), kmeans(x, 8))
    assert kmeans(x[:3], 8).shape == (3, 6)  # at most one centre per row
    assert kmeans(x[:0], 8).shape == (0, 6)


def test_encode_error_is_the_residual_rounding() -> None:
    x = _blobs(200)
    bank = encode(x, kmeans(x, 5), torch.float16)
    assert bank.codes.dtype == torch.int32 and bank.residuals.dtype == torch.float16
    residual = x - bank.codebook[bank.codes.long()]
    error = (bank.decode() - x).abs()
    assert bool((error <= 2**-11 * residual.abs() + 1e-5).all())
    plain = (x.half().float() - x).abs()
    assert error.mean() < plain.mean() / 20  # values ~10, residuals mostly ~0.05: finer


@pytest.mark.parametrize("train_rows", [10, 4096])
def test_stream_is_batch_invariant(monkeypatch: pytest.MonkeyPatch, train_rows: int) -> None:
    """The codebook depends on the first TRAIN_ROWS rows only (coded at the end if never
    reached): any batching gives the same bank."""
    monkeypatch.setattr(B, "TRAIN_ROWS", train_rows)
    monkeypatch.setattr(B, "CODEBOOK_SIZE", 4)
    x = _blobs(57)
    whole = _stream(x, [57])
    for sizes in ([7, 3, 20, 27], [1] * 57, [10, 0, 47]):
        other = _stream(x, sizes)
        assert torch.equal(other.codebook, whole.codebook)
        assert torch.equal(other.codes, whole.codes)
        assert torch.equal(other.residuals, whole.residuals)
    torch.testing.assert_close(whole.decode(), x, rtol=2**-10, atol=3e-3)  # float16 residuals
    # the codebook was trained on the first min(TRAIN_ROWS, n) rows
    torch.testing.assert_close(whole.codebook, kmeans(x[:train_rows]), rtol=0, atol=0)


def test_merged_ranks_keep_the_union_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank states concatenated in rank order (what the distributed merge does): the bank
    holds the union in order; ranks that never reached TRAIN_ROWS are coded together, which
    is bitwise the single-process bank when no rank reached it."""
    monkeypatch.setattr(B, "CODEBOOK_SIZE", 4)
    x = _blobs(60)

    def rank_state(rows: torch.Tensor, sizes: list[int]) -> CalibState:
        state = CalibState()
        start = 0
        for size in sizes:
            append_rows(state, "f", rows[start : start + size], "float16")
            start += size
        return state

    def merged(bounds: list[int]) -> ResidualBank:
        state = CalibState()
        for a, b in itertools.pairwise(bounds):
            if b > a:  # an empty rank contributes no part
                state.merge(rank_state(x[a:b], [5] * ((b - a) // 5) + [(b - a) % 5]))
        bank = take_rows(state, "f")
        assert isinstance(bank, ResidualBank)
        return bank

    monkeypatch.setattr(B, "TRAIN_ROWS", 100)  # no rank reaches it: bitwise single process
    single, union = _stream(x, [60]), merged([0, 25, 25, 60])
    assert torch.equal(union.codes, single.codes) and torch.equal(union.codebook, single.codebook)
    assert torch.equal(union.residuals, single.residuals)
    monkeypatch.setattr(B, "TRAIN_ROWS", 20)  # ranks 0 and 2 code their own rows, rank 1 not
    union = merged([0, 25, 35, 60])
    assert len(union) == 60 and len(union.codebook) == 12  # three codebooks of 4
    torch.testing.assert_close(union.decode(), x, rtol=2**-10, atol=3e-3)  # the union, in order


def test_coded_index_searches_the_decoded_rows() -> None:
    x, queries = _blobs(300), _blobs(40, seed=1)
    bank = encode(x, kmeans(x, 8), torch.float16)
    coded, decoded = Index(dim=6, metric="l2"), Index(dim=6, metric="l2")
    coded.add(bank)
    decoded.add(bank.decode())
    assert isinstance(coded.stored, ResidualBank) and coded.ntotal == 300
    d_coded, i_coded = coded.search(queries, 7)
    d_decoded, i_decoded = decoded.search(queries, 7)
    assert torch.equal(i_coded, i_decoded)
    torch.testing.assert_close(d_coded, d_decoded, rtol=0, atol=0)
    # plain rows added later are coded against the same codebook; removal keeps codes aligned
    coded.add(x[:5])
    assert coded.ntotal == 305 and len(coded.stored.codebook) == 8  # type: ignore[union-attr]
    assert coded.remove_ids(torch.arange(0, 300)) == 300
    torch.testing.assert_close(coded.samples, x[:5], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["KNN", "LID", "Trust", "DkNN"])
def test_coded_banks_survive_save_and_load(name: str, tmp_path: object) -> None:
    from pathlib import Path

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    net = make_net()
    rnet = Recorder(net, input_data=x[:1])
    rnet.record((1, 3))
    extra = {"alpha": 0.1} if name == "Trust" else {}
    score = getattr(scores, name)(k=3, bank_dtype="float16", **extra).fit(rnet, x, y)
    path = Path(str(tmp_path)) / "score.pt"
    score.save(path)
    loaded = scio.load_score(path, net)
    stored = (
        loaded.kept_features
        if name == "Trust"
        else (loaded.indexes[0] if name == "DkNN" else loaded.index).stored
    )
    assert isinstance(stored, ResidualBank) and stored.codebook.dtype == torch.float32
    torch.testing.assert_close(loaded(x[:6])[1], score(x[:6])[1], rtol=0, atol=0)


def test_backend_list_matches_the_index_backends() -> None:
    import typing

    from scio.index.index import IndexBackend

    assert typing.get_args(IndexBackend) == B._BACKENDS


def test_banks_sharing_a_codebook_store_it_once() -> None:
    x = _blobs(100)
    bank = encode(x, kmeans(x, 6), torch.float16)
    index = Index(dim=6, metric="l2")
    index.add(bank[:50])
    index.add(bank[50:])
    stored = index.stored
    assert isinstance(stored, ResidualBank) and len(stored.codebook) == 6
    other = encode(x[:10], kmeans(x[:10], 3), torch.float16)
    index.add(other)  # another codebook: appended, codes shifted
    assert len(index.stored.codebook) == 9  # type: ignore[union-attr]
    torch.testing.assert_close(index.samples[-10:], other.decode(), rtol=0, atol=0)
