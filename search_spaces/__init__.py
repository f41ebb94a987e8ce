"""Search spaces shipped with alternas: the default ``--space`` of ``alternas optuna`` for each base."""
