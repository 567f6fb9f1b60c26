"""The throttled progress line of one long loop (medtransfer_jax.ticker), on a fake clock."""
from medtransfer_jax import ticker
from medtransfer_jax.studies import progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_at_most_one_line_per_interval_with_eta_and_rate():
    clock, lines, waits = Clock(), [], []
    t = ticker.Ticker("evaluate test", interval=10, clock=clock, echo=lines.append)
    t.start(100, rate_unit="img/s")
    for done in range(10, 101, 10):         # a batch of 10 every 4 s
        clock.t += 4
        t.update(done, wait=lambda: waits.append(clock.t))
    assert lines == ["evaluate test: 30/100 images, 2.5 img/s, 12 s, ETA 28 s",
                     "evaluate test: 60/100 images, 2.5 img/s, 24 s, ETA 16 s",
                     "evaluate test: 90/100 images, 2.5 img/s, 36 s, ETA 4 s"]
    assert waits == [112.0, 124.0, 136.0]    # only when a line is printed
    assert t.update(100, force=True).endswith("40 s, ETA 0 s")
    assert t.say("done") == "evaluate test: done" and lines[-1] == "evaluate test: done"


def test_interval_zero_prints_every_step_and_start_restarts():
    lines = []
    t = ticker.Ticker("pair A vs B", interval=0, clock=Clock(), echo=lines.append)
    t.start(3, "models")
    assert t.update(0) == "pair A vs B: 0/3 models, 0 s, ETA ?"
    t.update(1, "a (2 layers)")
    assert lines[-1] == "pair A vs B: 1/3 models, a (2 layers), 0 s, ETA 0 s"
    assert len(lines) == 2


def test_the_default_interval_is_read_when_the_ticker_is_made(monkeypatch):
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)
    assert ticker.Ticker("x").interval == 0.0


def test_format_duration_is_one_function_for_both_layers():
    assert progress.format_duration is ticker.format_duration
    assert [ticker.format_duration(s) for s in (41, 250, 4320, float("inf"))] == [
        "41 s", "4m10s", "1h12m", "?"]


def test_reset_restarts_the_interval_a_line_printed_elsewhere_counts():
    """A training run's log.every_steps line resets its log.every_secs ticker."""
    now, out = [0.0], []
    t = ticker.Ticker("train", interval=30, clock=lambda: now[0], echo=out.append)
    now[0] = 29.0
    assert not t.due()
    now[0] = 31.0
    assert t.due()
    t.reset()
    assert not t.due()
    now[0] = 61.5
    assert t.due() and t.say("step 5/8") == "train: step 5/8" and out == ["train: step 5/8"]
    assert not t.due()


def test_the_default_echo_prints_on_the_first_process_only(monkeypatch, capsys):
    """Every host of a multi-host evaluate runs the same loop: one line, not one per host."""
    import jax
    t = ticker.Ticker("evaluate test", interval=0)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    t.say("from host 1")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    t.say("from host 0")
    assert capsys.readouterr().out == "evaluate test: from host 0\n"
