"""Speed, memory and accuracy benchmarks; each writes its figures as JSON."""
