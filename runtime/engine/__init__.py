"""Running a loaded model: the runner (one forward pass at a time, with its statistics), sessions
(one conversation's ids and state), the generation loop and the user-facing Engine."""
