"""Values, errors, settings and languages every other package uses; imports nothing of Hark."""
