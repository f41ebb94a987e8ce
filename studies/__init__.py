"""Study templates shipped with alternas: ``alternas buildup --study quickstart`` finds them from any folder."""
