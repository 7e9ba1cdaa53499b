(function () {
  const cones = JSON.parse(document.getElementById('cone-data').textContent);
  const sides = JSON.parse(document.getElementById('report-sides').textContent);  // the first split's sides 1 and 2
  const select = document.getElementById('cone-select');
  const slider = document.getElementById('cone-slider');
  const imgs = document.querySelectorAll('#cone-images img');
  function gauss(x, m, s, w) { const z = (x - m) / s; return w * Math.exp(-0.5 * z * z) / (s * Math.sqrt(2 * Math.PI)); }
  function draw(i) {
    const d = cones[i];
    const traces = [];
    const layout = {
      template: 'plotly_white', margin: {l: 55, r: 60, t: 40, b: 45}, bargap: 0,
      title: {text: 'cone ' + d.cone, x: 0.5},
      xaxis: {title: {text: 'rho (first principal component)'}},
      yaxis: {title: {text: 'density'}},
      yaxis2: {title: {text: 'synchronised llr'}, overlaying: 'y', side: 'right', tickmode: 'auto',
               zeroline: true, zerolinecolor: '#7b3294', showgrid: false},
      legend: {orientation: 'h', y: -0.18}, shapes: []
    };
    if (d.density.length) {
      const e = d.edges, x = [], w = [];
      for (let k = 0; k + 1 < e.length; k++) { x.push(0.5 * (e[k] + e[k + 1])); w.push(e[k + 1] - e[k]); }
      traces.push({type: 'bar', x: x, y: d.density, width: w, name: 'rho', marker: {color: '#bbbbbb'}});
      if (d.sigma > 0) {
        const lo = Math.min(e[0], d.mean2 - 3 * d.sigma), hi = Math.max(e[e.length - 1], d.mean1 + 3 * d.sigma);
        const xs = [], n1 = [], n2 = [], sum = [], llr = [];
        const w1 = d.weight1, w2 = 1 - d.weight1;
        for (let k = 0; k <= 200; k++) {
          const v = lo + (hi - lo) * k / 200;
          const a = gauss(v, d.mean1, d.sigma, w1), b = gauss(v, d.mean2, d.sigma, w2);
          xs.push(v); n1.push(a); n2.push(b); sum.push(a + b);
          const z1 = (v - d.mean1) / d.sigma, z2 = (v - d.mean2) / d.sigma;
          llr.push(d.sign * (Math.log(w1 / w2) - 0.5 * (z1 * z1 - z2 * z2)));
        }
        const k1 = d.sign > 0 ? 1 : 2, k2 = 3 - k1;
        traces.push({x: xs, y: sum, mode: 'lines', name: 'mixture', line: {color: '#555555', dash: 'dash', width: 1.5}});
        traces.push({x: xs, y: n1, mode: 'lines', name: 'component 1 → ' + sides[k1].label, line: {color: sides[k1].colour, width: 2.5}});
        traces.push({x: xs, y: n2, mode: 'lines', name: 'component 2 → ' + sides[k2].label, line: {color: sides[k2].colour, width: 2.5}});
        traces.push({x: xs, y: llr, mode: 'lines', name: 'synchronised llr', yaxis: 'y2', line: {color: '#7b3294', width: 1.5}});
      }
    } else {
      layout.annotations = [{text: 'no particles in this cone', showarrow: false, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5}];
    }
    Plotly.react('cone-histogram', traces, layout, {displaylogo: false, responsive: true});
    const f = (v, n) => (v === null ? 'n/a' : Number(v).toFixed(n));
    document.getElementById('cone-facts').textContent =
      'cone ' + d.cone + ' | ' + d.particles + ' particles | rot ' + f(d.rot, 1) + '°, tilt ' + f(d.tilt, 1) +
      '° | explained variance ' + f(d.explained * 100, 1) + '% | separation ' + f(d.separation, 2) +
      ' σ | weight1 ' + f(d.weight1, 2) + ' | sign ' + (d.sign > 0 ? '+1' : '−1') + ' | graph part ' + d.component +
      ' | side ' + sides[1].label + ': ' + (d.class1_fraction === null ? 'n/a' : f(d.class1_fraction * 100, 0) + '%');
    imgs.forEach((img, k) => { if (d.images.length) { img.src = d.images[k]; } else { img.removeAttribute('src'); } });
    select.value = String(i); slider.value = String(i);
  }
  select.addEventListener('change', () => draw(Number(select.value)));
  slider.addEventListener('input', () => draw(Number(slider.value)));
  document.getElementById('cone-prev').addEventListener('click', () => draw(Math.max(0, Number(select.value) - 1)));
  document.getElementById('cone-next').addEventListener('click', () => draw(Math.min(cones.length - 1, Number(select.value) + 1)));
  const byCone = {}; cones.forEach((d, i) => { byCone[d.cone] = i; });
  ['cone-graph', 'cone-directions'].forEach(id => {
    const gd = document.getElementById(id);
    if (gd && gd.on) {
      gd.on('plotly_click', ev => {
        const p = ev.points && ev.points[0];
        if (p && p.customdata !== undefined && byCone[p.customdata] !== undefined) {
          draw(byCone[p.customdata]);
          document.getElementById('cone-panel').scrollIntoView({behavior: 'smooth'});
        }
      });
    }
  });
  if (cones.length) { draw(0); }
})();
