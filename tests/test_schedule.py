import pytest

from selfcal.calibration.schedule import LinearSchedule


def test_first_step_is_t_initial_and_step_n_is_t_final():
    s = LinearSchedule(t_initial=0.5, t_final=1.5, steps=10)
    assert s(0) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.5)


def test_linear_in_between_and_constant_after():
    s = LinearSchedule(t_initial=2.0, t_final=0.0, steps=4)
    assert [s(i) for i in range(7)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_zero_steps_means_t_final_everywhere():
    s = LinearSchedule(t_initial=0.1, t_final=0.9, steps=0)
    assert s(0) == pytest.approx(0.9)
    assert s(100) == pytest.approx(0.9)


def test_paper_main_setting_is_constant():
    s = LinearSchedule(1.0, 1.0, 10)
    assert {s(i) for i in range(2048)} == {1.0}


@pytest.mark.parametrize("args", [(-0.1, 1.0, 10), (1.0, -1.0, 10), (1.0, 1.0, -1)])
def test_rejects_negative(args):
    with pytest.raises(ValueError):
        LinearSchedule(*args)


def test_a_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must be >= 0"):
        LinearSchedule(1.0, 1.0, 10)(-1)
