"""What composes criteria, planning, surgery and runtime, so it sits above them: the blend search."""
