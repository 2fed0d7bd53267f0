"""The ingest/drain rates shown by `status`."""
from flashlexd.rates import RateMeter


def test_rates_average_over_the_window_and_forget_older_samples():
    meter = RateMeter(window=10)
    assert meter.rates()["ingest_per_s"] == 0.0
    for second in range(30):
        received = second * 100 if second < 20 else 2000  # 100/s, then nothing
        meter.sample(float(second), received, second * 5)
    rates = meter.rates()
    assert rates["ingest_per_s"] < 20  # the busy seconds have left the window
    assert rates["drain_per_s"] == 5.0
    assert 9 <= rates["window_s"] <= 11
