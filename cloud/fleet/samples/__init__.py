"""The learning loop's field samples in the cloud: their store (files plus an index in the
fleet store, per-device daily quotas) and the fleet API that devices upload to."""

from cloud.fleet.samples.store import FieldSample, QuotaExceededError, SamplePage, SampleStore

__all__ = ["FieldSample", "QuotaExceededError", "SamplePage", "SampleStore"]
