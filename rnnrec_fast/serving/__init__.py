"""Low-latency serving of session recommenders (``rnnrec_fast.recsys`` models).

In process::

    from rnnrec_fast.serving import SessionRecommender
    rec = SessionRecommender.load("model.pt")
    items, scores = rec.click("session-1", 214821371, k=20)

Over HTTP: ``python -m rnnrec_fast.serving --model model.pt --host 127.0.0.1 --port 8000``
(see :mod:`rnnrec_fast.serving.app`).
"""
from .recommender import InvalidRequestError, ServingError, SessionRecommender, UnknownItemError
from .store import SessionStore

__all__ = ["SessionRecommender", "SessionStore", "ServingError", "UnknownItemError", "InvalidRequestError"]
