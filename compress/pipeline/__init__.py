"""The pass API and the contexts a pass runs in (phases and stores build on these)."""
