"""nbgrader configuration for the course: solutions/ is the source, chapters/ the student release.

Regenerate every student notebook after editing a solution:

    python tools/chapters.py

Instructors grading a class use the same settings from their own course folder; see README.md.
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

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
