# Sensitivity sweeps at the headline batch (modelled). Called by make_plots.sh.
set terminal pngcairo size 1000,760 font ",9"
set output out.'/paper_sensitivity'.suffix.'.png'
set multiplot layout 2,2 title sprintf('%s sensitivity at batch %s (modelled tokens/s%s)', model, batch, suffix eq '' ? '' : ', '.suffix[2:].' baselines')
set grid
set key top left
set logscale y
set ylabel 'tokens/s'
set xlabel 'drive-internal bandwidth, GB/s (flash channels x 1.4)'
set logscale x 2
plot dir.'/internal_host-offload.dat' u 1:2 w lp lw 2 t 'host offload', \
     dir.'/internal_flexgen-ssd.dat' u 1:2 w lp lw 2 t 'FlexGen SSD', \
     dir.'/internal_csd-dense.dat' u 1:2 w lp lw 2 t 'CSD dense', \
     dir.'/internal_csd-sparf.dat' u 1:2 w lp lw 2 t 'CSD SparF'
set xlabel 'host link, GB/s'
plot dir.'/hostlink_host-offload.dat' u 1:2 w lp lw 2 t 'host offload', \
     dir.'/hostlink_flexgen-ssd.dat' u 1:2 w lp lw 2 t 'FlexGen SSD', \
     dir.'/hostlink_csd-dense.dat' u 1:2 w lp lw 2 t 'CSD dense', \
     dir.'/hostlink_csd-sparf.dat' u 1:2 w lp lw 2 t 'CSD SparF'
set xlabel 'drives'
plot dir.'/drives_flexgen-ssd.dat' u 1:2 w lp lw 2 t 'FlexGen SSD (RAID-0)', \
     dir.'/drives_csd-dense.dat' u 1:2 w lp lw 2 t 'CSD dense', \
     dir.'/drives_csd-sparf.dat' u 1:2 w lp lw 2 t 'CSD SparF'
set xlabel 'SparF compression (fraction of dense K+V traffic)'
set y2label 'flash pages read / dense'
set y2tics
set y2range [0:1]
unset logscale y
set logscale y
plot dir.'/compression.dat' u 1:2 w lp lw 2 t 'CSD SparF tokens/s', \
     dir.'/compression.dat' u 1:3 axes x1y2 w lp lw 2 dt 2 t 'pages read (right)'
unset multiplot
