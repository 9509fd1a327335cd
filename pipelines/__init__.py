"""The sensing models and everything both sides of the split share: data, stages, compression,
activation codecs, per-stage profiles and the power model."""
