"""The report writer end to end on the embedded default, through the commands a researcher uses:
the tiny random Llama mirrored (`indai models mirror add`), the nestor work orders ingested and
turned into instruction records (`indai data instruct`), the shipped debug recipe trained by the
real launcher (Ray Train, DeepSpeed ZeRO-2, MLflow) with a loss that falls, the model registered
with its tags, and served by the real Serve app: a member gets bounded generated text, other
members and over-bound requests are refused."""
import pytest
import requests

pytestmark = pytest.mark.integration

MODEL = "it-report-writer"


@pytest.fixture(scope="module")
def trained(services, tmp_path_factory, repo):
    from indai.platform import cli
    from indai.platform.ingest import ingest
    from indai.platform.storage import open_store
    from indai.trainers.launch import train
    from indai.trainers.models.report_writer.tiny import build_tiny_lm

    folder = build_tiny_lm(tmp_path_factory.mktemp("tiny-llama-rw"))
    assert cli.main(["models", "mirror", "add", "tiny-llama-rw", str(folder), "--format", "hf", "--quiet",
                     "--source", "indai.trainers.models.report_writer.tiny (random init, tokenizer trained offline)",
                     "--licence", "Apache-2.0"]) == 0
    name, version, _ = ingest(repo / "examples" / "nestor-excavators" / "dataset.yaml", open_store(services.store_uri), progress=False)
    assert cli.main(["data", "instruct", f"{name}@{version}", "--max-records", "64", "--as", "it-nestor-instruct", "--quiet"]) == 0
    cfg = cli.load_train_config(str(repo / "trainers" / "recipes" / "report_writer_debug.yaml"),
                                ["data.dataset=it-nestor-instruct@latest", "run.name=it-report-writer", f"run.register_as={MODEL}",
                                 "run.progress=false", "run.checkpoint_every=5", "run.timing_skip=1", "run.profile_steps=1"])
    return cfg, train(cfg, services)


def test_training_lowers_the_loss_and_registers_the_model(trained, services):
    from mlflow.tracking import MlflowClient

    cfg, result = trained
    assert result.model_name == MODEL and result.model_version == 1 and result.alias == "champion"
    client = MlflowClient(tracking_uri=services.mlflow_uri)
    epochs = [m.value for m in sorted(client.get_metric_history(result.run_id, "epoch_train_loss"), key=lambda m: m.step)]
    val = [m.value for m in sorted(client.get_metric_history(result.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(epochs) == cfg.optim.epochs == len(val)
    assert epochs[-1] < 0.5 * epochs[0] and val[-1] < 0.7 * val[0], (epochs, val)
    assert result.task == "report" and result.test_metrics["loss"] < 0.7 * val[0]
    run = client.get_run(result.run_id)
    assert run.data.params["model.family"] == "report_writer" and run.data.params["strategy.chosen"] == "zero2"
    # run.profile_steps=1: one profiled step per worker, its trace an artifact of the run
    traces = {a.path for a in client.list_artifacts(result.run_id, "profile")}
    assert traces == {f"profile/rank-{r}.trace.json.gz" for r in range(cfg.run.workers)}
    assert run.data.metrics["profile_ms_per_step"] > 0
    mv = client.get_model_version(MODEL, "1")
    assert mv.tags["indai.family"] == "report_writer" and mv.tags["indai.lm"] == "tiny-llama-rw"
    assert mv.tags["indai.dataset"].startswith("it-nestor-instruct@")
    assert client.get_registered_model(MODEL).tags["indai.member"] == "nist-demo"


@pytest.fixture(scope="module")
def served(trained, services):
    from indai.platform import db, promotion, tenancy
    from indai.platform.cli import serve_model

    eng = db.engine()
    db.upgrade(eng)
    tokens = {}
    for member in ("nist-demo", "rw-other"):
        tenancy.add_member(eng, member, member.upper(), "other", "demand")
        tenancy.add_user(eng, f"u-{member}", member, "researcher")
        tokens[member] = tenancy.create_token(eng, f"u-{member}")[1]
    # who may call it is the platform database's (the registry's `indai.member` tag is only a hint)
    tenancy.set_model_access(eng, MODEL, owner="nist-demo", visibility="private")
    # and what it is served is the platform's promotion (the job's run.alias only labels the registry)
    promotion.promote(eng, services.mlflow_uri, MODEL, trained[1].model_version, "champion", by="test-admin")
    url = serve_model(f"{MODEL}@champion")
    yield url, tokens
    from ray import serve

    serve.delete("indai")


def ask(url, token, instance):
    return requests.post(f"{url}/v1/predict", json={"instances": [instance]}, headers={"Authorization": f"Bearer {token}"},
                         timeout=120)


def test_the_served_report_writer_answers_with_bounded_text(served):
    url, tokens = served
    r = ask(url, tokens["nist-demo"], {"instruction": "Summarise the likely fault and the next maintenance step.",
                                       "text": "Work order: L/H BUCKET CYL LEAKING", "max_new_tokens": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    answer = body["predictions"][0]
    assert body["model_version"] == 1 and set(answer) == {"text", "tokens", "finish_reason", "input_truncated"}
    assert 1 <= answer["tokens"] <= 20 and answer["text"].strip()
    assert answer["finish_reason"] == "eos" or answer["tokens"] == 20
    assert answer["text"].startswith("Likely fault"), answer  # the trained template, not random tokens
    ko = ask(url, tokens["nist-demo"], {"instruction": "예상 고장과 다음 정비 조치를 요약하세요.", "text": "작업지시서: ENGINE OVERHEATING"})
    assert ko.status_code == 200 and ko.json()["predictions"][0]["tokens"] <= 48  # the recipe's bound (debug flavour)
    info = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {tokens['nist-demo']}"}, timeout=30).json()
    assert info["modalities"] == [] and info["inputs"]["text"]["max_tokens"] == 96


def test_over_bound_requests_and_other_members_are_refused(served):
    url, tokens = served
    over = ask(url, tokens["nist-demo"], {"text": "Work order: PUMP LEAK", "max_new_tokens": 500})
    assert over.status_code == 400 and "bound of 48" in over.json()["detail"]
    assert ask(url, tokens["nist-demo"], {"text": "x", "sensor": [[0.0]]}).status_code == 400
    other = ask(url, tokens["rw-other"], {"text": "Work order: PUMP LEAK"})
    assert other.status_code == 403 and "belongs to another member" in other.json()["detail"]
    assert ask(url, tokens["nist-demo"], {"text": "Work order: PUMP LEAK", "max_new_tokens": 3}).json()["predictions"][0]["tokens"] <= 3
