"""The report writer on the tiny random Llama: prefix layout and label masking, bounded decoding
that stops at EOS, batch independence of left-padded decoding, and the artefact round trip
(what serving loads generates exactly what the trained module generates; tampering refused)."""
import json
import shutil

import numpy as np
import pytest
import torch

from indai.platform.errors import UserError
from indai.platform.report_format import IGNORE, assemble, prompt_ids
from indai.trainers.models.report_writer.config import ReportWriterConfig
from indai.trainers.models.report_writer.model import ReportWriter
from indai.trainers.models.report_writer.tiny import build_tiny_lm


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


def writer(lm_folder, modalities=(), **over) -> ReportWriter:
    cfg = ReportWriterConfig(flavour="debug", lm="tiny-llama", modalities=list(modalities),
                             sensor={"channels": 2, "length": 128}, **over)
    torch.manual_seed(0)
    return ReportWriter(cfg, lm_folder).eval()


def test_labels_cover_only_the_response_and_the_loss_is_the_lm_s_own(lm_folder):
    model = writer(lm_folder, ["sensor"])
    tok = model.tokens
    prompts = [prompt_ids(tok, "Summarise the fault.", "Work order: PUMP LEAK", 96)[0], prompt_ids(tok, "요약하세요.", "", 96)[0]]
    responses = [tok.encode("Likely fault: a leak.") + [tok.eos_id], tok.encode("예상 고장: 누설.") + [tok.eos_id]]
    sensor, mask = torch.randn(2, 2, 128), torch.tensor([[1.0, 0, 1], [0.0, 0, 0]])
    prefix = model.prefix_embeddings(2, sensor=sensor, mask=mask)
    k = model.cfg.sensor.tokens
    assert prefix.shape == (2, k, model.lm.config.hidden_size)
    x, attn, pos, labels = assemble(prefix, prompts, model.lm.get_input_embeddings(), tok.pad, responses)
    for i in range(2):
        n = k + len(prompts[i]) + len(responses[i])
        assert labels[i, : k + len(prompts[i])].eq(IGNORE).all()  # prefix and instruction: no loss
        assert labels[i, k + len(prompts[i]): n].tolist() == responses[i]
        assert labels[i, n:].eq(IGNORE).all() and attn[i, :n].eq(1).all() and attn[i, n:].eq(0).all()
        assert pos[i, :n].tolist() == list(range(n))
        torch.testing.assert_close(x[i, :k], prefix[i])
    # a sample without the sensor gets the learned placeholder, not the encoder's output
    torch.testing.assert_close(prefix[1], model.prefix["sensor"].absent)
    loss, n_tokens = model(prompts, responses, sensor=sensor, mask=mask)
    assert n_tokens == sum(len(r) for r in responses)
    reference = model.lm(inputs_embeds=x, attention_mask=attn, position_ids=pos, labels=labels).loss
    torch.testing.assert_close(loss, reference)
    # changing only the prompt's text changes the inputs, never which tokens are scored
    other = [prompt_ids(tok, "Write a report.", "Work order: PUMP LEAK", 96)[0], prompts[1]]
    assert model(other, responses, sensor=sensor, mask=mask)[1] == n_tokens


def test_prompt_is_cut_to_the_input_bound(lm_folder):
    tok = writer(lm_folder).tokens
    short, cut = prompt_ids(tok, "Summarise.", "PUMP LEAK", 64)
    assert not cut
    long_ids, cut = prompt_ids(tok, "Summarise.", "PUMP LEAK " * 200, 64)
    overhead = len(prompt_ids(tok, "Summarise.", "", 64)[0]) + len(tok.encode("### Input:\n"))
    assert cut and len(long_ids) <= overhead + 64


def test_generation_is_bounded_and_stops_at_eos(lm_folder):
    model = writer(lm_folder)
    free = model.generate(["Summarise the likely fault."], ["Work order: BUCKET CYL LEAKING"], 12)[0]
    assert len(free[0]) <= 12
    if free[1] == "length":
        assert len(free[0]) == 12
    assert model.generate(["Summarise."], [""], 0)[0] == ([], "length")
    with pytest.raises(ValueError, match="bound"):
        model.generate(["Summarise."], [""], model.cfg.max_new_tokens + 1)
    # make the third greedy token the end of text: decoding stops there and drops it
    tokens = model.generate(["Summarise the likely fault."], ["Work order: BUCKET CYL LEAKING"], 6)[0][0]
    assert len(tokens) == 6
    model.tokens.eos = {tokens[2]}
    stopped, why = model.generate(["Summarise the likely fault."], ["Work order: BUCKET CYL LEAKING"], 6)[0]
    assert why == "eos" and stopped == tokens[: tokens.index(tokens[2])]


def test_sampling_is_seeded_and_batches_decode_like_single_rows(lm_folder):
    model = writer(lm_folder)
    ins = ["Summarise the likely fault.", "예상 고장과 다음 정비 조치를 요약하세요.", "Write."]
    txt = ["Work order: BUCKET CYL LEAKING AT THE LEFT HAND SIDE", "작업지시서: 엔진 과열", ""]
    batch = model.generate(ins, txt, [8, 5, 3])
    single = [model.generate([i], [t], n)[0] for i, t, n in zip(ins, txt, [8, 5, 3])]
    assert batch == single  # left padding and positions leave each row's decoding as it is alone
    assert [len(ids) for ids, _ in batch] == [8, 5, 3] or any(why == "eos" for _, why in batch)
    draw = lambda seed: model.generate(ins[:1], txt[:1], 8, temperature=1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(1) == draw(1)
    assert any(draw(s) != draw(1) for s in range(2, 6))


def _exported(tmp_path, lm_folder, model):
    from indai.trainers.models.report_writer.export import card_inputs, export

    card = {"family": "report_writer", "modalities": model.cfg.modalities, "classes": [],
            "inputs": card_inputs(model, {"channels": ["DE", "FE"], "sampling_rate_hz": 12000.0}),
            "generation": {"max_new_tokens": model.cfg.max_new_tokens, "temperature": 0.0, "default_instruction": "Summarise."}}
    folder = tmp_path / "indai_model"
    export(model, lm_folder, folder, card)
    return folder


def test_the_served_artefact_generates_what_the_trained_module_generates(tmp_path, lm_folder):
    from indai.platform.model_format import IndaiModel
    from indai.platform.modalities import images_to_tensor_layout

    model = writer(lm_folder, ["sensor", "image"])
    with torch.no_grad():  # adapters that change the output, so merging them is tested
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    sensor = np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32)
    image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    want = model.generate(["Describe the anomaly.", "요약하세요."], ["Sensor window.", "작업지시서: 누유"], 10,
                          sensor=torch.from_numpy(np.stack([sensor, np.zeros_like(sensor)])),
                          image=torch.from_numpy(images_to_tensor_layout(np.stack([image, np.zeros_like(image)]))),
                          mask=torch.tensor([[1.0, 1, 1], [0, 0, 1]]))
    folder = _exported(tmp_path, lm_folder, model)
    card = json.loads((folder / "indai_model.json").read_text())
    assert card["format"] == "indai-report-writer/1"
    assert {"lm/config.json", "lm/model.safetensors", "tokenizer.json", "prefix_sensor.pt2", "prefix_image.pt2"} <= set(card["files"])
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in card["files"])
    served = IndaiModel.load(folder)
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    out = served.predict([
        {"instruction": "Describe the anomaly.", "text": "Sensor window.", "sensor": sensor.tolist(),
         "image": base64.b64encode(png.getvalue()).decode(), "max_new_tokens": 10},
        {"instruction": "요약하세요.", "text": "작업지시서: 누유", "max_new_tokens": 10}])
    assert [o["text"] for o in out] == [served.tokens.decode(ids) for ids, _ in want]
    assert [o["tokens"] for o in out] == [len(ids) for ids, _ in want] and all(o["tokens"] <= 10 for o in out)
    default = served.predict([{"text": "Work order: PUMP LEAK"}])[0]
    assert default["tokens"] <= model.cfg.max_new_tokens and default["finish_reason"] in ("eos", "length")


def test_the_served_artefact_refuses_bad_requests_and_tampered_files(tmp_path, lm_folder):
    from indai.platform.model_format import IndaiModel

    model = writer(lm_folder)
    folder = _exported(tmp_path, lm_folder, model)
    served = IndaiModel.load(folder)
    bound = model.cfg.max_new_tokens
    for bad, needle in [({"text": "x", "max_new_tokens": bound + 1}, f"bound of {bound}"),
                        ({"text": "x", "max_new_tokens": 0}, "from 1"),
                        ({"text": "x", "colour": "red"}, "unknown input field"),
                        ({"text": "x", "sensor": [[0.0]]}, "text only"),
                        ({"instruction": "x" * 3000}, "over 2000")]:
        with pytest.raises(UserError, match=needle):
            served.prepare(bad)
    long = served.predict([{"text": "PUMP LEAK " * 500, "max_new_tokens": 2}])[0]
    assert long["input_truncated"] is True and long["tokens"] <= 2
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "notes.txt").write_text("extra")
    with pytest.raises(UserError, match="not in the card"):
        IndaiModel.load(copy)
    (copy / "notes.txt").unlink()
    weights = copy / "lm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the hash"):
        IndaiModel.load(copy)


def test_config_refuses_unknown_lora_targets_and_train_config_dispatches_by_family(lm_folder):
    from pydantic import ValidationError

    from indai.trainers.config import TrainConfig

    with pytest.raises(ValidationError, match="module names"):
        ReportWriterConfig(lm="tiny", lora={"targets": ["q_proj; rm"]})
    with pytest.raises(UserError, match="not modules of the LM"):
        writer(lm_folder, lora={"targets": ["query"]})
    base = {"recipe": "r", "data": {"dataset": "d"}, "run": {"name": "r"}}
    assert type(TrainConfig.model_validate(base).model).__name__ == "ModelConfig"
    rw = TrainConfig.model_validate({**base, "model": {"family": "report_writer", "lm": "tiny", "flavour": "debug"}})
    assert isinstance(rw.model, ReportWriterConfig) and rw.model.max_new_tokens == 48
    assert isinstance(TrainConfig.model_validate(rw.model_dump(mode="json")).model, ReportWriterConfig)
    trainable = {n for n, p in writer(lm_folder, ["sensor"]).named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("prefix.") for n in trainable)


def test_left_padded_batches_keep_each_row_where_it_ends(lm_folder):
    """Generation's layout: each row's prefix and prompt end at the last column, padding (zeros,
    never attended) in front; the embeddings are the row's own, whatever the others' lengths."""
    model = writer(lm_folder, ["sensor"])
    tok = model.tokens
    prompts = [prompt_ids(tok, "Summarise.", "PUMP LEAK", 96)[0], prompt_ids(tok, "요약하세요.", "엔진 과열 " * 6, 96)[0]]
    assert len(prompts[0]) != len(prompts[1])
    prefix = model.prefix_embeddings(2, sensor=torch.randn(2, 2, 128), mask=torch.ones(2, 3))
    embed = model.lm.get_input_embeddings()
    x, attn, pos, labels = assemble(prefix, prompts, embed, tok.pad)
    k, longest = prefix.shape[1], prefix.shape[1] + max(map(len, prompts))
    assert x.shape[:2] == attn.shape == pos.shape == (2, longest) and labels.eq(IGNORE).all()
    for i, ids in enumerate(prompts):
        start = longest - k - len(ids)
        assert attn[i, :start].eq(0).all() and attn[i, start:].eq(1).all() and x[i, :start].eq(0).all()
        assert pos[i, start:].tolist() == list(range(k + len(ids)))
        torch.testing.assert_close(x[i, start: start + k], prefix[i])
        torch.testing.assert_close(x[i, start + k:], embed(torch.tensor(ids)))


def test_the_frozen_lm_is_held_in_bf16_while_adapters_and_prefixes_train_in_fp32(lm_folder):
    from indai.trainers.models.report_writer.model import hold_frozen_in_bf16

    model = writer(lm_folder, ["sensor"]).train()
    frozen = sum(p.numel() for p in model.lm.parameters() if not p.requires_grad)
    assert hold_frozen_in_bf16(model.lm) == frozen > 0
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.lm.parameters())
    assert all(p.dtype == torch.float32 for p in model.prefix.parameters())  # encoders (BatchNorm too) are left alone
    assert all(b.dtype == torch.float32 for n, b in model.lm.named_buffers() if "inv_freq" in n)
    tok = model.tokens
    prompts = [prompt_ids(tok, "Summarise the fault.", "Work order: PUMP LEAK", 96)[0]] * 2
    responses = [tok.encode("Likely fault: a leak.") + [tok.eos_id]] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = model(prompts, responses, sensor=torch.randn(2, 2, 128), mask=torch.ones(2, 3))
    loss.backward()
    assert torch.isfinite(loss) and int(n) == 2 * len(responses[0])
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)  # A has none while B is 0
    assert hold_frozen_in_bf16(model.lm) == 0  # nothing left to cast
