# Decode throughput vs batch size, one line per method (modelled). Called by make_plots.sh.
set terminal pngcairo size 960,520 font ",10"
set output out.'/paper_throughput_vs_batch'.suffix.'.png'
set title sprintf('%s decode throughput vs batch (modelled%s; input 1024, output 1024)', model, suffix eq '' ? '' : ', '.suffix[2:].' baselines')
set xlabel 'batch size'
set ylabel 'tokens/s'
set logscale xy 2
set format y '%g'
set key outside right top
set grid
plot dir.'/batch_gpu-resident.dat' u 1:2 w lp lw 2 pt 7 t 'GPU-resident KV (until OOM)', \
     dir.'/batch_host-offload.dat' u 1:2 w lp lw 2 pt 5 t 'host-memory offload', \
     dir.'/batch_flexgen-ssd.dat' u 1:2 w lp lw 2 pt 9 t 'FlexGen-style SSD', \
     dir.'/batch_csd-dense.dat' u 1:2 w lp lw 2 pt 11 t 'CSD dense', \
     dir.'/batch_csd-sparf.dat' u 1:2 w lp lw 2 pt 13 t 'CSD SparF (1/8)', \
     dir.'/batch_csd-dense-x4.dat' u 1:2 w lp lw 1 dt 2 pt 11 t '4 CSDs dense', \
     dir.'/batch_csd-sparf-x2.dat' u 1:2 w lp lw 1 dt 2 pt 13 t '2 CSDs SparF'
