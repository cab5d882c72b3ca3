"""The stress corpus loader: deterministic, train/validation disjoint, clear errors."""

import pytest
import torch

from lbw_kernels.stress.corpus import batch_offsets, load_corpus, stdlib_files, val_offsets, windows


def write_files(root, n=25):
    root.mkdir()
    for i in range(n):
        # Unique content per file, so a shared file would show up as shared bytes.
        (root / f"f{i:02d}.txt").write_text(f"<file {i:02d}> " + "abcdefgh" * (20 + i) + "\n")
    return root


def test_folder_deterministic_and_disjoint(tmp_path):
    root = write_files(tmp_path / "c")
    a, b = load_corpus(str(root)), load_corpus(str(root))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.fingerprint == b.fingerprint
    assert set(a.train_files).isdisjoint(a.val_files)
    assert len(a.train_files) + len(a.val_files) == 25 and a.val_files
    train_text, val_text = bytes(a.train.tolist()).decode(), bytes(a.val.tolist()).decode()
    for i in range(25):
        assert (f"<file {i:02d}>" in train_text) != (f"<file {i:02d}>" in val_text)


def test_folder_order_does_not_depend_on_creation_order(tmp_path):
    root = write_files(tmp_path / "c")
    (tmp_path / "d").mkdir()
    for p in sorted(root.iterdir(), reverse=True):  # same files, written in the other order
        (tmp_path / "d" / p.name).write_bytes(p.read_bytes())
    assert load_corpus(str(root)).fingerprint == load_corpus(str(tmp_path / "d")).fingerprint


def test_single_file_split_by_bytes(tmp_path):
    path = tmp_path / "one.txt"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    c = load_corpus(str(path))
    assert len(c.train) + len(c.val) == len(data)
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == data


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(missing))


def test_stdlib_default_is_deterministic_and_disjoint():
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    assert all("site-packages" not in str(f) for f in files)
    a = load_corpus(None, max_train_bytes=50_000, max_val_bytes=10_000)
    b = load_corpus(None, max_train_bytes=50_000, max_val_bytes=10_000)
    assert a.fingerprint == b.fingerprint and len(a.train) == 50_000
    assert set(a.train_files).isdisjoint(a.val_files)


def test_batches_fixed_by_seed():
    assert torch.equal(batch_offsets(10_000, 16, 4, 5, seed=3), batch_offsets(10_000, 16, 4, 5, seed=3))
    assert not torch.equal(batch_offsets(10_000, 16, 4, 5, seed=3), batch_offsets(10_000, 16, 4, 5, seed=4))
    data = torch.arange(100, dtype=torch.uint8)
    x, y = windows(data, val_offsets(100, 8, 5), 8)
    assert x.shape == (5, 8) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="ctx"):
        batch_offsets(10, 16, 1, 1, seed=0)
