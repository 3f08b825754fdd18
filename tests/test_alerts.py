"""When open tracks are announced (`recognized`): once per track, unknowns after enough good
embeddings, a person not again within the cooldown on the same camera."""

import pytest

from app.alerts import Announcer
from app.config import AlertsConfig
from app.records import Match

pytestmark = pytest.mark.unit

ADA, NOBODY = Match("Ada", 0.8, "Ada"), Match(None, 0.2, "Ada")


def test_a_known_track_is_announced_once():
    a = Announcer(AlertsConfig(cooldown_s=0))
    assert [a.decide(1, ADA, 1, t) for t in (1.0, 1.2, 1.4)] == [True, False, False]


def test_unknown_after_n_good_embeddings_then_upgraded_when_matched():
    a = Announcer(AlertsConfig(unknown_after=3))
    assert [a.decide(1, NOBODY, good, 1.0) for good in (1, 2, 3, 4)] == [False, False, True, False]
    assert a.decide(1, ADA, 5, 1.5)  # the stranger turned out to be Ada: announced again
    assert not a.decide(1, ADA, 6, 1.6)


def test_cooldown_per_person_from_when_last_seen():
    a = Announcer(AlertsConfig(cooldown_s=10))
    assert a.decide(1, ADA, 1, 0.0)
    a.finish(1, end=5.0)
    assert not a.decide(2, ADA, 1, 14.0)  # 9 s after she was last seen
    a.finish(2, end=20.0)  # a suppressed track extends the cooldown
    assert not a.decide(3, ADA, 1, 29.0)
    a.finish(3, end=29.5)
    assert a.decide(4, ADA, 1, 40.0)
    assert a.decide(5, NOBODY, 3, 40.0)  # unknowns are never held back by the cooldown


def test_disabled():
    a = Announcer(AlertsConfig(enabled=False))
    assert not a.decide(1, ADA, 9, 0.0) and not a.decide(2, NOBODY, 9, 0.0)
