"""SegTrainer's precision: bf16 autocast on the forward, float32 loss, weights and optimizer."""
import pytest
import torch

from dass_ray import precision as prec
from dass_ray.config import SegmenterConfig
from dass_ray.seg_training import SegTrainer
from dass_ray.segmenters import build_segmenter


def _trainer(precision: str, seed: int = 0) -> SegTrainer:
    torch.manual_seed(seed)
    m = build_segmenter(SegmenterConfig(arch="small_cnn", width=8), 3)
    return SegTrainer(m, m, 0.05, 0.9, 0.0, torch.device("cpu"), precision=precision)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 3, (4, 16, 16), generator=g)
    return x, y


@pytest.mark.parametrize("step", ["source", "pair"])
def test_bf16_step_keeps_float32_and_follows_the_fp32_step(step):
    x, y = _batch()
    t32, t16 = _trainer("fp32"), _trainer("bf16")
    before = {k: v.clone() for k, v in t16.raw.state_dict().items()}
    for t in (t32, t16):
        out = t.step_source(x, y) if step == "source" else t.step_pair(x.flip(-1), x, y, l_src=True,
                                                                          similarity_weight=0.1)
        assert all(isinstance(v, float) and v == v for v in out.values())
    w32, w16 = t32.raw.state_dict(), t16.raw.state_dict()
    for k, v in w16.items():
        assert v.dtype == before[k].dtype  # autocast never changes the stored weights' dtype
    keys = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    d32 = torch.cat([(w32[k] - before[k]).flatten() for k in keys])
    d16 = torch.cat([(w16[k] - before[k]).flatten() for k in keys])
    assert float(d16.norm()) > 0  # the bf16 step did update the weights
    # the same update up to bf16 rounding of activations, not a different step
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) > 0.95
    assert float((d16 - d32).norm()) < 0.3 * float(d32.norm())
    for p in t16.raw.parameters():
        assert t16.opt.state[p]["momentum_buffer"].dtype == torch.float32


def test_bf16_forward_really_runs_in_bf16_and_returns_float32():
    x, _ = _batch()
    t = _trainer("bf16")
    seen = []
    h = t.raw.register_forward_hook(lambda mod, i, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
    logits, pooled = t._forward(x, return_features=True)
    h.remove()
    assert seen == [torch.bfloat16]  # the model's own output, inside autocast
    assert logits.dtype == torch.float32 and pooled.dtype == torch.float32
    assert _trainer("fp32")._forward(x).dtype == torch.float32


def test_auto_precision_follows_the_probe(monkeypatch):
    x, _ = _batch()
    for native, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(prec, "bf16_is_native", lambda device, native=native: native)
        t = _trainer("auto")
        seen = []
        t.raw.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
        t._forward(x)
        assert seen == [want]
    with pytest.raises(ValueError, match="precision 'half'"):
        prec.resolve_precision("half", "cpu")
