import Foundation

/// A loss curve as a self-contained SVG: training loss per step and validation loss at each
/// evaluation, on shared axes, with tick labels.
public enum LossPlot {
    /// The SVG text of a plot of `train` and `validation` losses against the step, titled `title`;
    /// non-finite losses are left out.
    public static func svg(train: [(step: Int, loss: Float)], validation: [(step: Int, loss: Float)],
                           title: String, width: Int = 720, height: Int = 420) -> String {
        let all = (train + validation).filter { $0.loss.isFinite }
        guard let first = all.first else { return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(width)\" height=\"\(height)\"/>" }
        let maxStep = max(all.map(\.step).max() ?? 1, 1)
        var low = all.map(\.loss).min() ?? first.loss, high = all.map(\.loss).max() ?? first.loss
        if high - low < 1e-3 { high += 0.5; low -= 0.5 }
        let (left, right, top, bottom) = (60.0, 20.0, 40.0, 50.0)
        let plotWidth = Double(width) - left - right, plotHeight = Double(height) - top - bottom
        func x(_ step: Int) -> Double { left + plotWidth * Double(step) / Double(maxStep) }
        func y(_ loss: Float) -> Double { top + plotHeight * Double(high - loss) / Double(high - low) }
        func path(_ points: [(step: Int, loss: Float)]) -> String {
            points.filter { $0.loss.isFinite }.enumerated().map { i, p in
                String(format: "%@%.1f,%.1f", i == 0 ? "M" : "L", x(p.step), y(p.loss))
            }.joined(separator: " ")
        }
        var svg = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(width)" height="\(height)" font-family="sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(width / 2)" y="22" text-anchor="middle" font-size="14">\(title.replacingOccurrences(of: "<", with: "&lt;"))</text>
        <line x1="\(left)" y1="\(top + plotHeight)" x2="\(left + plotWidth)" y2="\(top + plotHeight)" stroke="black"/>
        <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(top + plotHeight)" stroke="black"/>

        """
        for i in 0...4 {
            let value = low + (high - low) * Float(i) / 4
            svg += String(format: "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3f</text>\n", left - 6, y(value) + 4, value)
            let step = maxStep * i / 4
            svg += String(format: "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%d</text>\n", x(step), top + plotHeight + 18, step)
        }
        svg += "<text x=\"\(Int(left + plotWidth / 2))\" y=\"\(height - 10)\" text-anchor=\"middle\">step</text>\n"
        svg += "<path d=\"\(path(train))\" fill=\"none\" stroke=\"#4477aa\" stroke-width=\"1.2\"/>\n"
        svg += "<path d=\"\(path(validation))\" fill=\"none\" stroke=\"#cc6677\" stroke-width=\"2\"/>\n"
        svg += "<text x=\"\(Int(left) + 10)\" y=\"\(Int(top) + 14)\" fill=\"#4477aa\">train loss (nats/token)</text>\n"
        svg += "<text x=\"\(Int(left) + 10)\" y=\"\(Int(top) + 30)\" fill=\"#cc6677\">validation loss</text>\n"
        return svg + "</svg>\n"
    }
}
