package io.clusterapp.counter;

import java.io.IOException;
import java.io.PrintWriter;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSession;

/**
 * GET /counter/ increments the session attribute {@code count} and shows it.
 * setAttribute on every request is what makes DeltaManager replicate it.
 */
public class CounterServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        HttpSession session = req.getSession(true);
        Integer previous = (Integer) session.getAttribute("count");
        int count = previous == null ? 1 : previous + 1;
        session.setAttribute("count", Integer.valueOf(count));

        String route = Route.jvmRoute();
        resp.setHeader("X-Counter", Integer.toString(count));
        resp.setHeader("X-Route", route);
        resp.setHeader("X-Session-Id", session.getId());
        resp.setHeader("Cache-Control", "no-store");
        resp.setContentType("text/html;charset=UTF-8");
        PrintWriter out = resp.getWriter();
        out.println("<!doctype html><html><head><title>counter</title></head><body>");
        out.println("<h1>Tambah = " + count + "</h1>");
        out.println("<p>node: " + escape(route) + "</p>");
        out.println("</body></html>");
    }

    private static String escape(String s) {
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;");
    }
}
