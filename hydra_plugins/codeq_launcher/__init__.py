"""codeq's Hydra launcher (conf/hydra/launcher/joblib.yaml)."""
