//! A plain-text table with aligned columns, the default output of every command.
//!
//! Columns are separated by two spaces and padded to their widest cell (counted in characters); the last column
//! is not padded, so long values such as errors do not push trailing spaces. No borders, no colours, no wrapping:
//! output that `grep` and `awk` handle as well as people do.

/// Rows of cells under an optional header.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table whose first row is `header` (pass `&[]` for a key/value listing with no header).
    pub fn new(header: &[&str]) -> Table {
        let rows = if header.is_empty() { Vec::new() } else { vec![header.iter().map(|h| h.to_string()).collect()] };
        Table { rows }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| self.rows.iter().filter_map(|row| row.get(c)).map(|cell| cell.chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let mut table = Table::new(&["QUEUE", "QUEUED"]);
        table.row(vec!["emails".into(), "3".into()]);
        table.row(vec!["é".into(), "12".into()]);
        assert_eq!(table.render(), "QUEUE   QUEUED\nemails  3\né       12\n");
    }
}
