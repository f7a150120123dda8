"""The small shared runtime of the three jobs (pretraining, fine-tuning, explanations): atomic
files, the output-folder lock, lazy package exports, figures, seeding, device and precision
names and the optimisation recipe. It imports nothing else of this package, so any layer may use it; a job
never borrows these pieces from another job."""
