"""Rank 0's progress events and lines reach the driver of a Ray run through its board
(trainers.relay), on the embedded default's real Ray: a progress bar and the lines above it on a
terminal, the lines a worker would have printed elsewhere, in the order rank 0 sent them."""
import io
import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def connected(services):
    import ray

    mine = not ray.is_initialized()
    if mine:
        from indai.platform.services import use_ray_auth

        use_ray_auth()  # the embedded default's Ray asks for its token, as run_workers connects
        ray.init(address=services.require_ray(), log_to_driver=False, logging_level="WARNING")
    yield
    if mine:
        ray.shutdown()


def _rank0(env: dict) -> None:
    """What the train loop's rank 0 sends, from a Ray worker process with the driver's board in its environment."""
    import ray

    @ray.remote(num_cpus=0, runtime_env={"env_vars": env})
    def worker() -> str:
        from indai.trainers import relay

        for step in (1, 2, 3, 4):
            relay.event(epoch=1, epochs=2, step=step, steps=8, loss=round(1.0 / step, 5))
        relay.say("epoch 1/2: loss 0.5208 (1.0 s)")
        relay.event(epoch=2, epochs=2, step=8, steps=8, loss=0.125, val_accuracy=0.75)
        relay.say("epoch 2/2: loss 0.1250 (1.0 s)")
        return relay.PROGRESS_PREFIX

    assert ray.get(worker.remote(), timeout=120) == "[indai] progress "


def test_on_a_terminal_the_driver_draws_the_bar_and_prints_the_lines(connected, capfd):
    from indai.trainers import relay

    screen = io.StringIO()
    show = relay.Show(stream=screen, terminal=True)
    with relay.board(show) as env:
        assert set(env) == {relay.BOARD_ENV}
        _rank0(env)
    text = screen.getvalue()
    assert "epoch 1/2: loss 0.5208" in text and text.index("epoch 1/2") < text.index("epoch 2/2: loss 0.1250")
    assert "[indai] progress" not in text and "[indai] progress" not in capfd.readouterr().out  # no raw JSON
    bar = show.follower
    assert (bar.bar.n, bar.bar.total) == (8, 8)  # the last event's step of the run's steps
    assert bar.out.last_progress == {"epoch": 2, "epochs": 2, "step": 8, "steps": 8, "loss": 0.125, "val_accuracy": 0.75}
    assert "8/8" in text and "val_acc=0.750" in text


def test_elsewhere_the_driver_prints_the_lines_a_worker_would_have(connected, capfd):
    """In a cluster job's log this is what `indai train submit` follows: events on stdout, lines on stderr."""
    from indai.trainers import relay

    err = io.StringIO()
    with relay.board(relay.Show(stream=err, terminal=False)) as env:
        _rank0(env)
    out = capfd.readouterr().out
    events = [json.loads(line[len(relay.PROGRESS_PREFIX):]) for line in out.splitlines() if line.startswith(relay.PROGRESS_PREFIX)]
    assert [e["step"] for e in events] == [1, 2, 3, 4, 8] and events[-1]["val_accuracy"] == 0.75
    assert err.getvalue().splitlines() == ["epoch 1/2: loss 0.5208 (1.0 s)", "epoch 2/2: loss 0.1250 (1.0 s)"]


def test_without_a_board_a_worker_prints_them_itself(capfd, monkeypatch):
    """The local launcher, torchrun and the loop called directly: the same lines, from the worker."""
    from indai.trainers import relay

    monkeypatch.delenv(relay.BOARD_ENV, raising=False)
    relay.event(epoch=1, epochs=1, step=3, steps=3, loss=0.5)
    relay.say("epoch 1/1: loss 0.5000 (0.1 s)")
    got = capfd.readouterr()
    assert got.out == '[indai] progress {"epoch": 1, "epochs": 1, "step": 3, "steps": 3, "loss": 0.5}\n'
    assert got.err == "epoch 1/1: loss 0.5000 (0.1 s)\n"
