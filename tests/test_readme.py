"""The README's "Use" example, run as written: a changed API or a renamed telemetry key fails
here instead of in a user's first training loop.

The example's code block is taken from README.md itself (the first ```python block), with
the names it leaves to the reader (``model``, ``loader``) bound to a tiny language model. The
telemetry keys its comment shows must be the keys ``telemetry()`` returns.
"""

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _use_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def _documented_keys(code: str) -> list:
    """The keys of the dict printed in the example's comment (``#  {'policy': ..., ...}``)."""
    comment = " ".join(line.split("#", 1)[1] for line in code.splitlines() if "#" in line and "'" in line)
    return re.findall(r"'(\w+)':", comment)


class TinyLM(torch.nn.Module):
    """Embedding -> linear head with a cross-entropy ``.loss``, like a Hugging Face model."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        logits = self.head(self.embed(tokens[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


def test_readme_use_example_runs_and_documents_the_telemetry_keys(capsys):
    code = _use_example()
    assert "GuardedAdamW(" in code and "opt.step()" in code  # the block is the one meant
    torch.manual_seed(0)
    model = TinyLM()
    before = [p.detach().clone() for p in model.parameters()]
    loader = [torch.randint(0, 50, (4, 9)) for _ in range(3)]
    scope = dict(model=model, loader=loader)
    exec(compile(code, "README.md (the Use example)", "exec"), scope)

    opt = scope["opt"]
    telemetry = opt.telemetry()
    assert telemetry["step"] == len(loader)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "a param did not move"
    documented = _documented_keys(code)
    assert documented == list(telemetry), f"README shows {documented}, telemetry() returns {list(telemetry)}"
    assert telemetry["policy"] == "zscore" and math.isfinite(telemetry["scale"])
    # the norm the example logs is the last call's: with stats_freq=1, the one the guard analysed
    assert float(scope["grad_norm"]) == pytest.approx(telemetry["grad_norm"], rel=1e-12) and telemetry["grad_norm"] > 0
    printed = capsys.readouterr().out.count("'policy': 'zscore'")
    assert printed == sum(1 for step in range(len(loader)) if step % 100 == 0)  # the example's schedule


def test_documented_keys_parser_sees_a_missing_key():
    """The comparison above can fail: a key dropped from the comment is noticed."""
    code = _use_example()
    keys = _documented_keys(code)
    assert "skipped_steps" in keys
    assert "skipped_steps" not in _documented_keys(code.replace("'skipped_steps': 0,", ""))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
