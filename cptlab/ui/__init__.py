"""Interactive widgets (ipywidgets) for JupyterLab, one module each; they call the library, nothing in the
library imports them.

    ScheduleExplorer   move a learning-rate schedule's parameters and see it over several stages,
                       overlaid with other kinds or with pinned schedules
    RunLauncher        train a continual run in the background with live forgetting curves; stop, resume
    ResultsBrowser     overlay stored runs' curves with their references and their final-loss table
    SequenceBrowser    forgetting matrices and loss curves of the sequence study's methods, side by side

Each widget is a plain class holding its controls; display it as a cell's last value (it shows
``self.widget``). Constructing or displaying one never trains anything. Its state is readable without a
front end (for tests): the figure it draws is ``self.figure`` and accessor methods return the plotted data.
"""

from cptlab.ui.results_browser import ResultsBrowser
from cptlab.ui.run_launcher import RunLauncher
from cptlab.ui.schedule_explorer import ScheduleExplorer
from cptlab.ui.sequence_browser import SequenceBrowser

__all__ = ["ResultsBrowser", "RunLauncher", "ScheduleExplorer", "SequenceBrowser"]
