"""Calibration: corpora → token windows per named protocol, Hessians, the layer-streaming pipeline."""
