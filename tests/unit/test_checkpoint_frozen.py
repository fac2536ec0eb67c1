"""Checkpoints leave out frozen parameters (trainers.checkpoint): the resumed run rebuilds them from
the same pretrained weights, a fingerprint proves it did, and a model whose frozen weights or
frozen set changed is refused with a clear error instead of training on from other weights."""
import re

import pytest
import torch
from safetensors.torch import load, save

from indai.platform.errors import UserError
from indai.platform.storage import open_store
from indai.trainers import checkpoint
from indai.trainers.engine import TorchEngine


class Net(torch.nn.Module):
    """A 'pretrained' backbone (frozen), a trainable head, and an output tied to the embedding."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(32, 16)
        self.backbone = torch.nn.Linear(16, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, 4)
        self.out = torch.nn.Linear(16, 32, bias=False)
        self.out.weight = self.embed.weight  # tied, as in LMs
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, ids):
        h = self.norm(self.backbone(self.embed(ids).mean(1)))
        return self.head(h).sum() + self.out(h).sum() * 0.01


def engine_for(model: Net, freeze=("backbone", "embed")) -> TorchEngine:
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(freeze))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return TorchEngine(model, opt, None, device=torch.device("cpu"), world=1, rank=0)


def train(engine: TorchEngine, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = engine(torch.randint(0, 32, (8, 5), generator=g))
        engine.backward(loss)
        engine.step()


def saved(store, run="r", tag="epoch-00000") -> dict[str, torch.Tensor]:
    return load(store.get_bytes(f"checkpoints/{run}/{tag}/model.safetensors"))


def test_frozen_parameters_are_left_out_and_a_resume_restores_the_trained_state(tmp_path, capfd):
    store = open_store(tmp_path / "store")
    trained = engine_for(Net())
    train(trained)
    checkpoint.save(trained, store, "r", "epoch-00000", {"epoch": 0, "step": 3}, rank=0)
    # the log says what was written and what was left out (512 + 256 + 16 frozen parameters)
    assert re.search(r"\[indai\] checkpoint epoch-00000: \d+\.\d MiB from rank 0 in \d+\.\d s; 3 frozen tensors "
                     r"\(784 parameters\) left out", capfd.readouterr().err)

    held = saved(store)
    # the frozen backbone and the (frozen, tied) embedding are not in it; what trains and the
    # BatchNorm statistics are
    assert set(held) == {"head.weight", "head.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                         "norm.num_batches_tracked"}
    frozen = store.read_commit("checkpoints/r/epoch-00000")["frozen"]
    assert set(frozen) == {"embed.weight", "backbone.weight", "backbone.bias"}
    assert frozen["backbone.weight"][0] == 256 and frozen["embed.weight"][0] == 512

    resumed = engine_for(Net())  # built again from the same "pretrained" weights
    state = checkpoint.load(resumed, store, "r", "epoch-00000")
    assert state["step"] == 3
    for (name, a), b in zip(trained.module.state_dict().items(), resumed.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.module.out.weight is resumed.module.embed.weight  # still tied
    # the optimizer goes on where it stopped: one more step gives the same weights on both
    train(trained, 1)
    train(resumed, 1)
    torch.testing.assert_close(trained.module.head.weight, resumed.module.head.weight, rtol=0, atol=0)


def test_a_model_whose_frozen_weights_changed_is_refused(tmp_path):
    store = open_store(tmp_path / "store")
    trained = engine_for(Net())
    train(trained)
    checkpoint.save(trained, store, "r", "epoch-00000", {"epoch": 0, "step": 3}, rank=0)

    other = Net()
    with torch.no_grad():
        other.backbone.weight[3, 4] += 0.5  # one weight of the "pretrained" backbone differs
    with pytest.raises(UserError, match=r"differ from the ones it trained with \(1 of 3, e.g. backbone.weight\)"):
        checkpoint.load(engine_for(other), store, "r", "epoch-00000")
    with pytest.raises(UserError, match="no longer frozen: backbone.bias, backbone.weight"):
        checkpoint.load(engine_for(Net(), freeze=("embed",)), store, "r", "epoch-00000")
    with pytest.raises(UserError, match="newly frozen: head.bias, head.weight"):
        checkpoint.load(engine_for(Net(), freeze=("backbone", "embed", "head")), store, "r", "epoch-00000")


def test_the_fingerprint_is_the_same_for_frozen_weights_held_in_bf16():
    """The report writer holds its frozen LM in bf16 on a GPU; a resume on fp32 weights must agree."""
    fp32 = engine_for(Net()).module
    bf16 = engine_for(Net()).module
    for p in bf16.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    a, b = checkpoint.frozen_fingerprint(fp32), checkpoint.frozen_fingerprint(bf16)
    assert a == b and len(a) == 3
    fresh = Net(seed=5)
    engine_for(fresh)
    assert checkpoint.frozen_fingerprint(fresh)["backbone.weight"] != a["backbone.weight"]


def test_a_checkpoint_that_lacks_a_trained_tensor_is_refused_even_with_frozen_ones_allowed(tmp_path):
    trained = engine_for(Net())
    train(trained)
    folder = tmp_path / "local"
    trained.save_checkpoint(str(folder), "t", {}, exclude_frozen_parameters=True)
    held = load((folder / "t/model.safetensors").read_bytes())
    del held["head.bias"]
    (folder / "t/model.safetensors").write_bytes(save(held))
    with pytest.raises(UserError, match=r"1 tensor\(s\) missing or unexpected, e.g. head.bias"):
        engine_for(Net()).load_checkpoint(str(folder), "t", custom_load_fn=checkpoint.module_loader(True, "t"))
    # and a strict load (a checkpoint from before frozen parameters were left out) wants them all, the tied output too
    with pytest.raises(UserError, match=r"5 tensor\(s\) missing or unexpected, e.g. backbone.bias, backbone.weight, embed.weight"):
        engine_for(Net()).load_checkpoint(str(folder), "t")


def test_a_checkpoint_from_before_holds_every_weight_and_still_loads(tmp_path):
    """Commits without "frozen" (older checkpoints) are loaded strictly, from their full weights."""
    store = open_store(tmp_path / "store")
    trained = engine_for(Net())
    train(trained)
    trained.save_checkpoint(str(tmp_path / "ckpt"), "epoch-00000", {"epoch": 0, "step": 3})
    store.upload_dir("checkpoints/old/epoch-00000", tmp_path / "ckpt/epoch-00000")
    store.commit("checkpoints/old/epoch-00000", {"epoch": 0, "step": 3, "strategy": "ddp"})
    assert "backbone.weight" in saved(store, "old")
    other = Net(seed=9)  # other frozen weights: the checkpoint's own are loaded over them
    state = checkpoint.load(engine_for(other), store, "old", "epoch-00000")
    assert state["step"] == 3
    torch.testing.assert_close(other.backbone.weight, trained.module.backbone.weight, rtol=0, atol=0)



def test_the_checksum_is_exact_whatever_the_partition_and_sees_one_changed_weight():
    """ZeRO-3 ranks each sum their own slice of a tensor (starting anywhere, across chunk
    boundaries); the all-reduced sums equal the whole tensor's. One weight moved by one bf16 step
    (what separates a base LM from a lightly fine-tuned one) changes it."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(checkpoint._CHUNK * 2 + 12345, generator=g) * 0.02
    whole = checkpoint._checksum(t, 0)
    cuts = [0, 777, checkpoint._CHUNK - 5, checkpoint._CHUNK + 1, 2 * checkpoint._CHUNK + 3, t.numel()]
    parts = sum(checkpoint._checksum(t[a:b], a) for a, b in zip(cuts, cuts[1:]))
    parts[1] %= checkpoint._P
    whole[1] %= checkpoint._P
    assert parts.tolist() == whole.tolist()

    bits = t.to(torch.bfloat16)
    nudged = bits.clone()
    nudged.view(torch.int16)[checkpoint._CHUNK + 99] += 1  # the next bf16 value of one weight
    a, b = checkpoint._checksum(bits, 0), checkpoint._checksum(nudged, 0)
    assert a.tolist() != b.tolist()
    swapped = bits.clone()
    swapped[[10, 20]] = swapped[[20, 10]]  # the same values in other places: the positions' weights tell
    c = checkpoint._checksum(swapped, 0)
    assert c[0] == a[0] and c[1] % checkpoint._P != a[1] % checkpoint._P
