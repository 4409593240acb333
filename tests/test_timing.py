from stages.train.timing import eta_seconds, format_duration


def test_eta_uses_the_mean_pace():
    assert eta_seconds(10, 100, 20.0) == 180.0
    assert eta_seconds(0, 100, 5.0) is None
    assert eta_seconds(100, 100, 50.0) == 0


def test_format_duration():
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(65) == "1m05s"
    assert format_duration(9.4) == "9s"
    assert format_duration(None) == "?"

