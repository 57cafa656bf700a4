"""Layer: metrics, calibration, evaluation reports."""
