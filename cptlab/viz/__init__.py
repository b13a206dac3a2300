"""The lab's figures, one function per paper figure, each returning a matplotlib ``Figure``.

    1  plot_compute_vs_loss   compute vs average final loss: continual + replay vs union baselines  (finals)
    2  plot_warmup            D0 and D1 loss vs tokens for each re-warming length                  (curves)
    3  plot_max_lr            D0 and D1 loss vs tokens: constant LR, re-warm, re-warm + re-decay   (curves)
    4  plot_replay_curves     D0 and D1 loss vs tokens for each replay fraction of one shift       (curves)
       plot_replay_table      final D0, D1 and average loss vs replay fraction (Table 2)           (finals)
    5  plot_rewarm_same_data  D0 loss vs tokens when re-warming on D0 itself                       (curves)
    6  plot_schedules         LR against tokens for one or more multi-stage schedules           (schedules)
       plot_paper_schedules   the paper's schedules over 3 stages: repeated cosine vs infinite  (schedules)
    7  plot_infinite          loss vs tokens over 3 chunks: repeated cosine vs infinite schedules  (curves)
    -  plot_forgetting        D0 and D1 loss vs tokens: no replay, replay, union baseline          (curves)
    -  plot_scale_forgetting  forgetting vs model size, no replay and chosen replay                 (scales)
    -  plot_scale_compute     average final loss vs compute at each model size                     (scales)
    -  plot_interpolation     D0 and D1 loss along the path between two runs' weights              (merges)
    -  plot_forgetting_matrices  loss after each dataset on every dataset, one heatmap per method (sequences)
    -  plot_sequence_curves   loss on every dataset vs tokens through a sequence of datasets   (sequences)
    -  plot_predictions       predicted (dashed) vs measured (solid) loss curves of held-out runs (predict)
    -  plot_cpt_predictions   CPT law: held-out runs' D0 / D1 predicted (dashed) vs measured       (predict)
    -  plot_prediction_errors final-loss and mean curve error of each held-out run                 (predict)
    -  plot_replay_law        D0 forgetting and D1 loss vs replay fraction: runs, law, left-out    (predict)
    -  plot_predicted_losses  predicted loss of schedules never trained                            (predict)
    -  plot_recipes           today's recipes' final D0 / D1 minus the paper recipe's               (modern)
    -  plot_recipe_curves     D0 and D1 loss vs tokens of chosen runs                               (modern)
    -  plot_chunk_ends        loss at each chunk end: cosine to 10%, D2Z, WSD, WSD-S               (modern)
    -  plot_microanneal       a microanneal's ranking of candidate corpora vs the full runs'       (modern)

Figures are built with ``matplotlib.figure.Figure`` (not pyplot), so nothing is kept in pyplot's global
state and nothing pops up on its own; show one in a notebook by making it a cell's last value, or save it
with ``save_figure``. Every function takes ``ax=None`` (``axes=None`` for several panels) to draw into
existing axes instead. ``cptlab.viz.common`` holds the styles and conventions they share.
"""

from cptlab.viz.common import format_tokens, save_figure
from cptlab.viz.curves import (
    plot_forgetting,
    plot_infinite,
    plot_max_lr,
    plot_replay_curves,
    plot_rewarm_same_data,
    plot_warmup,
)
from cptlab.viz.finals import plot_compute_vs_loss, plot_replay_table
from cptlab.viz.merges import plot_interpolation
from cptlab.viz.modern import plot_chunk_ends, plot_microanneal, plot_recipe_curves, plot_recipes
from cptlab.viz.predict import (
    plot_cpt_predictions,
    plot_predicted_losses,
    plot_prediction_errors,
    plot_predictions,
    plot_replay_law,
)
from cptlab.viz.scales import plot_scale_compute, plot_scale_forgetting
from cptlab.viz.schedules import plot_paper_schedules, plot_schedules, schedule_curve
from cptlab.viz.sequences import plot_forgetting_matrices, plot_sequence_curves

__all__ = ["format_tokens", "save_figure", "schedule_curve", "plot_schedules", "plot_paper_schedules",
           "plot_compute_vs_loss", "plot_warmup", "plot_max_lr", "plot_replay_curves", "plot_replay_table",
           "plot_rewarm_same_data", "plot_infinite", "plot_forgetting", "plot_scale_forgetting",
           "plot_scale_compute", "plot_interpolation", "plot_predictions", "plot_cpt_predictions",
           "plot_prediction_errors", "plot_replay_law", "plot_predicted_losses", "plot_forgetting_matrices",
           "plot_sequence_curves", "plot_recipes", "plot_recipe_curves", "plot_chunk_ends",
           "plot_microanneal"]
