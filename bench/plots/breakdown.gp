# Per-step time by resource at the headline batch (modelled). GPU and KV path overlap in a
# pipeline: the step is the larger of the two, not their sum. Called by make_plots.sh.
set terminal pngcairo size 800,520 font ",10"
set output out.'/paper_breakdown'.suffix.'.png'
set title sprintf('%s time per decode step at batch %s (modelled)', model, batch)
set ylabel 'ms per step (log)'
set logscale y
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -20
set key top right
set grid ytics
set yrange [1:*]
plot dir.'/breakdown.dat' u ($2 > 0 ? $2 : NaN):xtic(1) t 'GPU compute', \
     '' u ($3 > 0 ? $3 : NaN) t 'KV transfer (host link / SSD)', \
     '' u ($4 > 0 ? $4 : NaN) t 'in-storage attention (flash)', \
     '' u ($5 > 0 ? $5 : NaN) t 'drive link (q,k,v,out)', \
     '' u 6 t 'step (pipelined)'
