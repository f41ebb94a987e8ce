"""Searches over placements: study files and folders, the shared candidate evaluator, build-up and Optuna."""

from alternas.search.buildup import run_buildup
from alternas.search.evaluator import CandidateResult, Evaluator, candidate_key
from alternas.search.policy import BuildupPolicy
from alternas.search.study import StudyConfig, StudyFolder, load_study, study_from_dict, with_overrides

__all__ = [
    "BuildupPolicy", "CandidateResult", "Evaluator", "StudyConfig", "StudyFolder", "candidate_key", "load_study",
    "run_buildup", "study_from_dict", "with_overrides",
]
