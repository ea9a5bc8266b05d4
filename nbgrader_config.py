"""nbgrader configuration for the course: solutions/ is the source, chapters/ the student release.

Regenerate every student notebook after editing a solution:

    python tools/chapters.py

Instructors grading a class use the same settings from their own course folder; see INSTRUCTORS.md
for the whole workflow, what each setting below protects against, and how to isolate the grader.
"""

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "chapters"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]

# Every legitimate cell of a chapter finishes in seconds on a laptop CPU when graded (heavy demos
# check NBGRADER_EXECUTION and shrink); 120 s per cell leaves a slow machine room while an
# infinite loop costs one cell two minutes, not the whole batch.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# A student who deletes a locked test cell gets it back at grading time instead of skipping it.
c.OverwriteCells.add_missing_cells = True

# Autograding runs students' code. The course's execute step (utils/grading.py, GradingExecute)
# replaces nbgrader's: it runs the course's guard before every graded cell (checks replaced by a
# learner's code are put back), keeps grading when a kernel dies or ignores an interrupt (that
# cell and the later graded cells score 0, the batch goes on), caps each kernel's memory and each
# cell's output, and keeps stderr (warnings, progress bars) from failing a correct answer: the
# course's checks fail by raising. Before it, RepairCells mends the nbgrader metadata that editors
# and copy-paste break (nbgrader 0.9.6 stops grading that student otherwise). The other steps are
# nbgrader's defaults, in nbgrader's order.
c.Autograde.sanitize_preprocessors = [
    "nbgrader.preprocessors.ClearOutput",
    "utils.grading.RepairCells",  # duplicated, unknown, stripped or missing nbgrader cells: see utils/grading.py
    "nbgrader.preprocessors.DeduplicateIds",
    "nbgrader.preprocessors.OverwriteKernelspec",
    "nbgrader.preprocessors.OverwriteCells",
    "nbgrader.preprocessors.CheckCellMetadata",
]
c.Autograde.autograde_preprocessors = [
    "utils.grading.GradingExecute",
    "nbgrader.preprocessors.IgnorePattern",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]
c.GradingExecute.memory_limit_mb = 8192      # per kernel (Linux); a bigger allocation raises MemoryError
c.GradingExecute.max_output_chars = 200_000  # per cell while it runs; LimitOutput then keeps 1000 lines

# Feedback shows each check's result sentence but not the hidden tests' code: with their seeds and
# edge cases in every student's feedback, next term's class could hard-code them.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "nbgrader.preprocessors.ClearHiddenTests",
]

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
